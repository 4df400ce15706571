"""The quickstart's Perl idiom: create objects and timers, then EventLoop()."""

import socket

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT


class Reader(DS):
    """A PublicInbox::DS subclass, Python spelling: one event_step, lines in."""

    def event_step(self):
        rbuf = self.rbuf if self.rbuf is not None else bytearray()
        while self.do_read(rbuf, 4096, len(rbuf)):  # until EAGAIN or EOF
            pass
        while b"\n" in rbuf:
            line, _, rest = rbuf.partition(b"\n")
            print("line", bytes(line))
            rbuf = rest
        self.rbuf_idle(rbuf)  # keep a partial line, drop an empty buffer
        # do_read re-armed EPOLLIN|EPOLLONESHOT (EAGAIN) or closed us (EOF).


a, b = socket.socketpair()
Reader(a, EPOLLIN | EPOLLONESHOT)  # registered in this thread's pending state
ds_trio.add_timer(0.1, b.send, b"hello\n")  # callback(*args), as newer DS
ds_trio.add_timer(0.2, b.close)  # EOF: the Reader closes itself

ds_trio.EventLoop()  # trio; EventLoop(backend="asyncio") works the same
# Nothing was left (no object, no timer, no queued work): the loop finished.
assert ds_trio.DescriptorMap() == {}

# Single-stepping, as DS's own tests do: a false post-loop callback ends the
# loop after one round, and the state stays for the next call until Reset().
a, b = socket.socketpair()
reader = Reader(a, EPOLLIN | EPOLLONESHOT)
ds_trio.SetPostLoopCallback(lambda descriptor_map: False)
ds_trio.SetLoopTimeout(0)  # milliseconds, as in Perl: never idle
ds_trio.EventLoop()
assert ds_trio.DescriptorMap() == {a.fileno(): reader}
b.send(b"one round later\n")
ds_trio.EventLoop()  # prints: line b'one round later'
ds_trio.Reset()  # closes the reader, clears the callback and the timeout
b.close()
