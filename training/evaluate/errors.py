"""The evaluator's error type (its own module so every other module of the package can raise it)."""


class EvalError(ValueError):
    """Evaluation that cannot run as asked; the message says what was wrong and what is allowed."""
