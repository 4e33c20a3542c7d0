"""The bank layer: :class:`AdapterBank` composed of a task registry, a byte-bounded task cache, a storage
pool and a replica builder (one module each). ``AdapterBank`` is imported on first use."""

__all__ = ["AdapterBank"]


def __getattr__(name: str):
    if name == "AdapterBank":
        from liedeploy.bank.adapter_bank import AdapterBank

        return AdapterBank
    raise AttributeError(f"module 'liedeploy.bank' has no attribute {name!r}")
