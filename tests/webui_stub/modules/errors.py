import logging


def display(e: Exception, task, *, full_traceback=False):
    logging.getLogger("webui").error("%s: %s: %s", task, type(e).__name__, e)


def report(message: str, *, exc_info: bool = False) -> None:
    logging.getLogger("webui").error(message, exc_info=exc_info)
