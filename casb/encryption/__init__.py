"""Encryption controls: TLS / plaintext refusal, at-rest (SSE) rules, and proxy-side
envelope encryption (AES-256-GCM streaming, keys wrapped by a keyring)."""
