"""Stand-in: vLLM's policy base class."""


class AbstractEplbPolicy:
    pass
