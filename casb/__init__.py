"""casb: an inline Cloud Access Security Broker for medical imaging."""

__version__ = "0.1.0"
