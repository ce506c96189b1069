"""Repeated log lines: once per window, with a count of those left out (server/observe/log_limits.py)."""

import asyncio
import errno
import logging

from server.observe.log_limits import ACCEPT_FAILED, RepeatFilter, Repeats, loop_exception_handler


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def logger_with(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)
    return logger


def test_a_repeated_error_is_told_once_per_window_with_the_count_left_out():
    clock, lines = Clock(), Lines()
    lines.addFilter(RepeatFilter(60, clock))
    log = logger_with(lines, "test.repeats")
    for _ in range(1000):
        log.error("accept failed on %s", "port 8000")
    log.error("accept failed on %s", "port 8001")  # another line: told at once
    clock.now = 61
    log.error("accept failed on %s", "port 8000")
    assert lines.lines == [
        "accept failed on port 8000",
        "accept failed on port 8001",
        "accept failed on port 8000 [and 999 more like this in the last 60 s, not logged]",
    ]


def test_lines_below_warning_and_a_zero_window_pass_untouched():
    clock, lines = Clock(), Lines()
    lines.addFilter(RepeatFilter(60, clock))
    log = logger_with(lines, "test.info")
    for _ in range(3):
        log.info("scraped")
    assert lines.lines == ["scraped"] * 3
    assert [Repeats(0).admit("same") for _ in range(3)] == [0, 0, 0]


def test_repeats_forget_the_line_told_longest_ago_beyond_their_size():
    clock = Clock()
    repeats = Repeats(60, clock, max_keys=2)
    assert [repeats.admit(key) for key in ("a", "b", "c")] == [0, 0, 0]
    assert repeats.admit("a") == 0  # forgotten: told again
    assert repeats.admit("c") is None


def test_the_accept_storm_costs_one_line_per_window(caplog):
    clock = Clock()
    handle = loop_exception_handler(Repeats(60, clock))
    loop = asyncio.new_event_loop()
    try:
        context = {"message": ACCEPT_FAILED, "exception": OSError(errno.EMFILE, "Too many open files")}
        with caplog.at_level(logging.ERROR):
            for _ in range(2048):  # one readable listening socket: asyncio retries its whole backlog
                handle(loop, dict(context))
            clock.now = 60
            handle(loop, dict(context))
            handle(loop, {"message": "Task exception was never retrieved"})  # anything else: asyncio's own handler
    finally:
        loop.close()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3, messages
    assert messages[0].startswith("cannot accept new connections: [Errno 24] Too many open files")
    assert messages[1].endswith("[and 2047 more like this in the last 60 s, not logged]")
    assert messages[2] == "Task exception was never retrieved"
