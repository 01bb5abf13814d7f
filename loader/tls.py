"""TLS failures named: a certificate we do not trust is not a network that does not answer.

trio-websocket swallows the TLS error of a failed handshake and reports only a connect
timeout, so the context handed to it records what the handshake said. Whoever retries
connections asks `TlsWatch.untrusted()` after a failure: a certificate that failed
verification fails again on every retry (same image, same CA bundle), so it ends the run.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit


class TlsWatch:
    """Client TLS context for one endpoint that remembers why a handshake failed."""

    def __init__(self, url: str) -> None:
        self.host = urlsplit(url).hostname or url
        self.failure: ssl.SSLError | None = None
        self.context: ssl.SSLContext | None = None
        if urlsplit(url).scheme == "wss":
            self.context = ssl.create_default_context()
            self.context.sslobject_class = _recording(self)

    def untrusted(self) -> str | None:
        """The one-line cause when the last handshake rejected the server's certificate;
        forgets it, so a later unrelated failure is not blamed on it."""
        failure, self.failure = self.failure, None
        if isinstance(failure, ssl.SSLCertVerificationError):
            return (
                f"the TLS certificate of {self.host} is not trusted "
                f"({failure.verify_message or failure.reason}): the image's CA certificates "
                "do not cover it, or something between the pod and the server presents its own"
            )
        return None


def _recording(watch: TlsWatch) -> type[ssl.SSLObject]:
    class Recording(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # a non-blocking handshake in progress, not a failure
            except ssl.SSLError as exc:
                watch.failure = exc
                raise

    return Recording
