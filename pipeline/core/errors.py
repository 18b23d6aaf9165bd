"""The one exception type for failures the user can fix (bad params, no verified download,
a broken model file): stages print its message as one line, without a traceback. Bugs
still get their traceback. Its own module, with no imports, so that any layer can raise it."""


class UserError(Exception):
    """A failure whose message tells the user everything."""
