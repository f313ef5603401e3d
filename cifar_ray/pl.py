"""The one place the project imports Lightning: the package `ray.train.lightning` builds on
(`lightning.pytorch` when installed, else `pytorch_lightning`), or Ray's strategy is refused."""

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

__all__ = ["pl"]
