"""The server's behaviour, one service per resource; transport-free (routes translate HTTP to these calls).

They raise the project's errors (`ktl.errors`); ``ktl.api.errors`` maps those to HTTP status codes.
"""

from ktl.api.services.base import ServerParts
from ktl.api.services.federations import FederationService, hash_token
from ktl.api.services.jobs import JobService
from ktl.api.services.rounds import RoundService

__all__ = ["FederationService", "JobService", "RoundService", "ServerParts", "hash_token"]
