"""The WebRTC front end (aiortc): FastRTC's `POST /webrtc/offer`, one connection per session
(`connection.py`), its outgoing tracks (`tracks.py`) and freshest-frame video (`video.py`)."""

from .offer import MEDIA_KINDS, OfferBody, add_candidate, check_offer_sdp, negotiate, router

__all__ = ["MEDIA_KINDS", "OfferBody", "add_candidate", "check_offer_sdp", "negotiate", "router"]
