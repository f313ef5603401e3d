"""The one place the project imports Lightning.

`ray.train.lightning` builds on `lightning.pytorch` when the `lightning` package is installed and
on `pytorch_lightning` otherwise, and its strategy / callbacks only work with a Trainer from the
same package ("invalid strategy" otherwise). Some machine images ship both packages, so the
project follows Ray's rule instead of hard-coding one import.
"""

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

__all__ = ["pl"]
