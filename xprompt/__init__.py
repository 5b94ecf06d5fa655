"""xprompt: zero-shot cross-lingual transfer of prompt tuning."""

__version__ = "0.1.0"
