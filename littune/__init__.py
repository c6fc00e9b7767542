"""littune: Hub model + instruction file -> fine-tuned adapter, in four commands."""

__version__ = "0.1.0"
