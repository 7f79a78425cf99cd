"""Stand-in: binds the factory by name, as vLLM's elastic_execute does."""

from ..eplb.eplb_communicator import create_eplb_communicator  # noqa: F401
