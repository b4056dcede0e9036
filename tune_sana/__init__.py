"""tune-sana: find Sana fine-tuning settings that train well and stay finite."""

__version__ = "0.1.0"
