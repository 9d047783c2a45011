"""The learner's domain errors (the gRPC service maps them to status codes)."""


class NonFiniteLossError(FloatingPointError):
    """A training step produced a non-finite loss or gradient norm."""


class NothingToTrainError(RuntimeError):
    """``train_step`` was called with no submitted trajectories."""
