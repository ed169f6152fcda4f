"""The one exception type a user sees: a mistake in their input, explained in one sentence."""


class GatescopeError(Exception):
    """A problem with the user's input (model, corpus, atlas, options).

    The message is a complete sentence that says what is wrong and, where possible, what to
    do. The CLI prints it without a traceback and exits non-zero.
    """
