"""The errors quantkit raises for bad input. The CLI prints them as one line; library code never exits."""


class QuantkitError(Exception):
    """A known failure with a message fit for a user: it names the file/tensor/field and what was expected."""

    exit_code = 1


class CheckpointError(QuantkitError):
    """A source checkpoint is missing, incomplete, corrupt or inconsistent."""


class ConfigError(QuantkitError):
    """config.json / params.json is missing a field or names an unsupported architecture."""


class SchemeError(QuantkitError):
    """A quantization scheme, preset or override is invalid, or a format cannot hold it."""


class FormatError(QuantkitError):
    """A quantized checkpoint (GGUF, GPTQ, AWQ, compressed-tensors) is unreadable or malformed."""


class CalibrationError(QuantkitError):
    """Calibration data is missing, empty or too short."""


class OutputExistsError(QuantkitError):
    """The output path exists and --force was not given."""

    exit_code = 4


class CheckFailed(QuantkitError):
    """A verification or quality gate failed; outputs are kept."""

    exit_code = 3


class NonFiniteError(QuantkitError):
    """A model computed NaN or Inf (logits, NLL, KLD): the message names what was non-finite and, when the loaded
    weights explain it, which weight tensor holds NaN or Inf. Exit code 3: no result is reported."""

    exit_code = 3


class TokenizerError(QuantkitError):
    """A tokenizer file is missing or unreadable, or a chat conversation is malformed."""


class EvalError(QuantkitError):
    """An evaluation cannot run as asked (e.g. the text is shorter than one window)."""


class DeviceError(QuantkitError):
    """A requested device or kernel backend is not available here (e.g. --backend triton without a GPU)."""


class GenerationError(QuantkitError):
    """Generation cannot run as asked (e.g. the prompt does not fit the model's context)."""


class KernelBuildError(QuantkitError):
    """A C++ compiler (and ninja) is present but building or loading a quantkit C++ extension failed; the message
    carries the first lines of the compiler output. (A missing compiler is not an error: the kernels fall back.)"""


class WriteError(QuantkitError):
    """Writing an output failed (file-size limit, read-only or inaccessible path, ...); no half-written output is
    left behind."""

    exit_code = 4


class OutOfSpaceError(WriteError):
    """The disk filled up (or a quota ran out) while writing; the output was not created."""
