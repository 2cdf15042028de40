DROP INDEX bids_open_by_beneficiary;
