"""distft: distributed fine-tuning of frozen-backbone MXNet Gluon models."""

__version__ = "0.1.0"
