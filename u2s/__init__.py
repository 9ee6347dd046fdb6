"""u2s: Unsafe2Safe privacy anonymization of image datasets, as a distributed Ray job."""

__version__ = "0.1.0"
