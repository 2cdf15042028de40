"""Protobuf classes for every message of ``proto/syntropism/v1``, built at import from the
compiled descriptors (``descriptor.bin``, produced from ``proto/`` by the Rust build; a test keeps
it current). ``pb.PlaceBidRequest``, ``pb.Bundle`` … and enums as ``pb.BidStatus`` (a name ↔ number
helper)."""

from importlib import resources

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "syntropism.v1"


def _load():
    data = resources.files(__package__).joinpath("descriptor.bin").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    pool = descriptor_pool.DescriptorPool()
    pending = list(files)
    # Add each file after its dependencies.
    while pending:
        added = [f for f in pending if all(_has(pool, d) for d in f.dependency)]
        if not added:
            raise ImportError("syntropism: unresolvable protobuf dependencies")
        for f in added:
            pool.Add(f)
            pending.remove(f)
    ours = [f.name for f in files if f.package == _PACKAGE]
    return pool, message_factory.GetMessageClassesForFiles(ours, pool)


def _has(pool, name):
    try:
        pool.FindFileByName(name)
        return True
    except KeyError:
        return False


class Enum:
    """A protobuf enum: ``BidStatus.PENDING`` (or the full ``BID_STATUS_PENDING``) is a number;
    ``BidStatus.name(number)`` the short name."""

    def __init__(self, descriptor):
        self._descriptor = descriptor
        self._prefix = "".join("_" + c if c.isupper() else c.upper() for c in descriptor.name).lstrip("_") + "_"
        for value in descriptor.values:
            setattr(self, value.name, value.number)
            setattr(self, self._short(value.name), value.number)

    def _short(self, name):
        return name[len(self._prefix):] if name.startswith(self._prefix) else name

    def name(self, number):
        value = self._descriptor.values_by_number.get(number)
        return self._short(value.name) if value else str(number)


_pool, _classes = _load()
for _full, _cls in _classes.items():
    if _full.startswith(_PACKAGE + ".") and "." not in _full[len(_PACKAGE) + 1 :]:
        globals()[_full[len(_PACKAGE) + 1 :]] = _cls
for _name in ("ErrorCode", "BidStatus", "AccountStatus", "HoldStatus", "TransferKind", "MintReason", "SystemAccount"):
    globals()[_name] = Enum(_pool.FindEnumTypeByName(f"{_PACKAGE}.{_name}"))
