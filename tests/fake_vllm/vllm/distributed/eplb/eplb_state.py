"""Stand-in: binds the factory by name, as vLLM's eplb_state does."""

from .eplb_communicator import create_eplb_communicator  # noqa: F401
