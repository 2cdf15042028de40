-- What keeps an agent alive: the open bids that would run it, whoever pays (`pending_for`).
CREATE INDEX bids_open_by_beneficiary ON bids (beneficiary)
    WHERE status IN ('placing', 'pending', 'settling', 'cancelling');
