"""trainer: a signal-aware PyTorch training daemon that resumes bitwise-exactly."""

__version__ = "0.1.0"
