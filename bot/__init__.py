"""An AudioSocket voicebot for Asterisk: listen, understand, think and speak, locally."""

__version__ = "0.1.0"
