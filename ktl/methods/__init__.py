"""Federated methods, one module each, behind the one `Method` protocol (see `ktl.methods.base`).

Importing this package registers the built-in methods: ``local``, ``fedktl``, ``fedktl-latents``,
``fedproto``, ``fedtgp``, ``fd``, the secure-aggregation variants ``fedproto-secagg`` and
``fedktl-secagg``, and the HtFLlib baselines with a trainable classifier ``lg-fedavg``, ``fedgh``,
``fedgen``, ``fml``, ``fedkd`` and ``fedmrl``.
"""

from ktl.methods.base import (
    METHODS,
    SECTIONS,
    SUM_UPLOAD,
    UPLOAD_DTYPES,
    ClientUpdate,
    CostShape,
    Method,
    MethodContext,
    MethodSettings,
    Section,
    ServerCost,
    ServerUpdate,
    available_methods,
    decode_prototypes,
    get_method,
    load_method,
    register_method,
    validate_sections,
)
from ktl.methods.fedgen import FedGen
from ktl.methods.fedgh import FedGH
from ktl.methods.fedkd import FedKD
from ktl.methods.fedktl import (
    FedKTL,
    FedKTLLatents,
    FedKTLMethodSettings,
    FedKTLSettings,
    KnowledgeTransferServer,
    RoundResult,
    stack_uploads,
)
from ktl.methods.fedmrl import FedMRL
from ktl.methods.fml import FML
from ktl.methods.lgfedavg import LGFedAvg
from ktl.methods.local import LocalOnly
from ktl.methods.privacy import PrivacySettings, privacy_facts, private_prototypes
from ktl.methods.secure import FedKTLSecAgg, FedProtoSecAgg, SecureSumSettings
from ktl.methods.tables import (
    BaselineSettings,
    FedDistill,
    FedProto,
    FedTGP,
    TableMethod,
    TableMethodSettings,
    adaptive_margin,
    class_mean_table,
)

__all__ = [
    "METHODS",
    "SECTIONS",
    "SUM_UPLOAD",
    "UPLOAD_DTYPES",
    "BaselineSettings",
    "ClientUpdate",
    "CostShape",
    "FedDistill",
    "FedGH",
    "FedGen",
    "FedKD",
    "FedMRL",
    "FML",
    "LGFedAvg",
    "FedKTL",
    "FedKTLLatents",
    "FedKTLMethodSettings",
    "FedKTLSecAgg",
    "FedKTLSettings",
    "FedProto",
    "FedProtoSecAgg",
    "FedTGP",
    "KnowledgeTransferServer",
    "LocalOnly",
    "Method",
    "MethodContext",
    "MethodSettings",
    "PrivacySettings",
    "RoundResult",
    "Section",
    "ServerCost",
    "SecureSumSettings",
    "ServerUpdate",
    "TableMethod",
    "TableMethodSettings",
    "adaptive_margin",
    "available_methods",
    "class_mean_table",
    "decode_prototypes",
    "get_method",
    "load_method",
    "private_prototypes",
    "privacy_facts",
    "register_method",
    "stack_uploads",
    "validate_sections",
]
