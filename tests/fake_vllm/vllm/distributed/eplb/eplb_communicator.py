"""Stand-in: vLLM's communicator factory (name and keywords only)."""

CALLS: list[str] = []


def create_eplb_communicator(group_coordinator, backend, expert_weights, expert_buffer):
    if backend not in ("torch_nccl", "torch_gloo", "nixl", "pynccl"):
        raise ValueError(f"Unknown EPLB communicator backend: {backend}")
    CALLS.append(backend)
    return ("vllm-own", backend)
