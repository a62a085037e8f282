"""Every size cap of hapki's inputs, in one place: what each edge refuses before parsing.

Each cap is checked at the edge that receives the bytes, before any parser sees them (see docs/SECURITY.md,
"Input limits"). Bytes are raw wire bytes; characters are characters of a JSON string value.
"""

from __future__ import annotations

# A PEM CSR for RSA-8192 with a hundred SANs stays well under this; anything larger is refused unread.
MAX_CSR_CHARS = 32 * 1024
# One request message to CLM (NATS pki.v1.clm.* or an HTTP body), bytes, checked before parsing.
MAX_REQUEST_BYTES = 64 * 1024
# One signing request on the work queue (CLM -> CARA), bytes. What CLM approves fits: the re-encoded CSR
# (<= MAX_CSR_CHARS) plus at most 300 names of <= 255 characters. Also the signing stream's max_msg_size, so
# the server refuses anything larger at publish; CARA checks again before parsing (a stream made elsewhere).
MAX_SIGNING_REQUEST_BYTES = 2 * MAX_REQUEST_BYTES
# One result event (pki.v1.cara.issued / .failed) received by CLM, bytes: a leaf and a two-certificate chain in
# PEM are a few KiB, so this is generous and only bounds what a bad publisher can make CLM parse.
MAX_EVENT_BYTES = 2 * MAX_REQUEST_BYTES
# One OCSP request (POST body, or the decoded GET path), bytes: a single-certificate request with a nonce is
# about 100 bytes.
MAX_OCSP_REQUEST_BYTES = 4 * 1024
# The URL-encoded base64 request in GET /ocsp/{...}, characters. RFC 5019 5 has clients use GET only for requests
# under 255 bytes (about 1,000 characters once encoded); larger ones are POSTed. Below aiohttp's line limit (8190),
# so the refusal is an OCSP malformedRequest, not aiohttp's bare 400.
MAX_OCSP_GET_CHARS = 2048
