"""Talking to an OpenAI-compatible server: the client (retries, circuit breaker, ledger records), the HTTP
transport, the answer cache, the sanitiser of untrusted text, and the per-kernel and run-wide limits."""
