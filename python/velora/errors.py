"""The package's exception for numerical events.

Caller mistakes raise ``ValueError`` carrying the library's message (its std::invalid_argument,
which names the function, the argument and the values). Numerical events -- NaN/Inf in an input,
or finite values whose result would overflow -- are reported, not raised, by default (a step is
skipped as GradScaler does, a layer's ``last_status`` says why); where a caller asks for an
exception instead (``AdaRankGradAdamW(..., nonfinite="raise")``) it is ``NumericalError``.
"""


class NumericalError(ArithmeticError):
    """A numerical event (the library's status). Nothing was changed by the call that raised it.

    ``status`` is the library's status name: ``"non_finite_input"`` or ``"overflow"``;
    ``events`` lists ``(group, index, status)`` of the parameters concerned, where known.
    """

    def __init__(self, message, status, events=()):
        super().__init__(message)
        self.status = status
        self.events = list(events)
