/*
 * c_echo: the machine's ceiling for the bench protocol.
 *
 * Protocol: a line "bulk N\n" is answered with exactly N bytes; any other
 * line (ending in "\n") is echoed back verbatim.
 *
 * Usage: c_echo PORT      (PORT 0 picks a free one; prints "READY <port>")
 *
 * One thread, level-triggered epoll, non-blocking sockets.  It is written to
 * be the cheapest reasonable server, not the cleverest: input is read into
 * one static buffer and consecutive echo lines are sent straight from it in
 * one send(); per-connection heap buffers exist only while a connection has
 * a partial line or unsent output.  Like the DS clients, a connection with
 * unsent output stops reading (EPOLLOUT instead of EPOLLIN): that is the
 * back-pressure, and it keeps responses in request order.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define RBUF_SIZE (64 * 1024)
#define ZERO_SIZE (256 * 1024)
#define LINE_MAX_LEN (64 * 1024)

struct conn {
	int fd;
	int want_out;   /* registered for EPOLLOUT instead of EPOLLIN */
	char *in;       /* unprocessed input (partial line or queued lines) */
	size_t in_len, in_cap;
	char *out;      /* unsent echo bytes */
	size_t out_len, out_off, out_cap;
	unsigned long long zeros; /* unsent bulk bytes, sent after out */
};

static char rbuf[RBUF_SIZE];
static char zero_buf[ZERO_SIZE];
static int epfd;
static volatile sig_atomic_t stop;

static void on_term(int sig) { (void)sig; stop = 1; }

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void raise_nofile(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

static void append(char **buf, size_t *len, size_t *cap, const char *p, size_t n)
{
	if (*len + n > *cap) {
		size_t c = *cap ? *cap : 256;
		while (c < *len + n)
			c *= 2;
		*buf = realloc(*buf, c);
		if (!*buf)
			die("realloc");
		*cap = c;
	}
	memcpy(*buf + *len, p, n);
	*len += n;
}

static void conn_close(struct conn *c)
{
	close(c->fd); /* also removes it from the epoll set */
	free(c->in);
	free(c->out);
	free(c);
}

static void set_interest(struct conn *c, int want_out)
{
	struct epoll_event ev = {.events = want_out ? EPOLLOUT : EPOLLIN,
				 .data.ptr = c};
	if (c->want_out == want_out)
		return;
	c->want_out = want_out;
	if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
		die("epoll_ctl MOD");
}

/* Sends n bytes; returns how many went out, or -1 if the peer is gone. */
static ssize_t send_some(int fd, const char *p, size_t n)
{
	size_t done = 0;
	while (done < n) {
		ssize_t w = send(fd, p + done, n - done, MSG_NOSIGNAL);
		if (w > 0) {
			done += (size_t)w;
		} else if (w < 0 && errno == EINTR) {
			continue;
		} else if (w < 0 && errno == EAGAIN) {
			break;
		} else {
			return -1;
		}
	}
	return (ssize_t)done;
}

/* Flushes pending output; returns 1 if drained, 0 if blocked, -1 if dead. */
static int flush_out(struct conn *c)
{
	if (c->out_off < c->out_len) {
		ssize_t w = send_some(c->fd, c->out + c->out_off,
				      c->out_len - c->out_off);
		if (w < 0)
			return -1;
		c->out_off += (size_t)w;
		if (c->out_off < c->out_len)
			return 0;
	}
	c->out_len = c->out_off = 0;
	while (c->zeros > 0) {
		size_t n = c->zeros < ZERO_SIZE ? (size_t)c->zeros : ZERO_SIZE;
		ssize_t w = send_some(c->fd, zero_buf, n);
		if (w < 0)
			return -1;
		c->zeros -= (unsigned long long)w;
		if ((size_t)w < n)
			return 0;
	}
	return 1;
}

/* "bulk " followed by one or more digits; anything else is echoed. */
static int is_bulk_line(const char *line, const char *nl)
{
	const char *d = line + 5;
	if (nl - line < 6 || memcmp(line, "bulk ", 5) != 0)
		return 0;
	for (; d < nl; d++)
		if (*d < '0' || *d > '9')
			return 0;
	return 1;
}

/*
 * Handles the complete lines in p[0..len).  Consecutive echo lines are one
 * contiguous span of the input, so they leave in one send().  Returns the
 * number of bytes consumed; stops early (after a bulk line, or when the
 * socket is full) leaving c->out/c->zeros pending.  *dead is set on error.
 */
static size_t process(struct conn *c, const char *p, size_t len, int *dead)
{
	size_t pos = 0, span = 0; /* span: echo bytes from pos not yet sent */
	*dead = 0;
	for (;;) {
		const char *line = p + pos + span;
		const char *nl = memchr(line, '\n', len - pos - span);
		int is_bulk;
		if (!nl)
			break;
		is_bulk = is_bulk_line(line, nl);
		if (!is_bulk) {
			span += (size_t)(nl - line) + 1;
			continue;
		}
		/* send echo span first, then queue the bulk bytes */
		if (span) {
			append(&c->out, &c->out_len, &c->out_cap, p + pos, span);
			pos += span;
			span = 0;
		}
		c->zeros = strtoull(line + 5, NULL, 10);
		pos += (size_t)(nl - line) + 1;
		int r = flush_out(c);
		if (r < 0) {
			*dead = 1;
			return pos;
		}
		if (r == 0)
			return pos;
	}
	if (span) {
		ssize_t w = send_some(c->fd, p + pos, span);
		if (w < 0) {
			*dead = 1;
			return pos;
		}
		if ((size_t)w < span)
			append(&c->out, &c->out_len, &c->out_cap, p + pos + w,
			       span - (size_t)w);
		pos += span;
	}
	return pos;
}

/* Processes buffered input then reads; keeps going until EAGAIN. */
static void on_event(struct conn *c)
{
	int dead = 0;
	if (c->want_out || c->out_len || c->zeros) {
		int r = flush_out(c);
		if (r < 0)
			goto dead;
		if (r == 0) {
			set_interest(c, 1);
			return;
		}
		/* drained: handle lines that arrived while we were blocked */
		if (c->in_len) {
			size_t used = process(c, c->in, c->in_len, &dead);
			if (dead)
				goto dead;
			memmove(c->in, c->in + used, c->in_len - used);
			c->in_len -= used;
			if (c->out_len || c->zeros) {
				set_interest(c, 1);
				return;
			}
		}
		set_interest(c, 0);
	}
	for (;;) {
		ssize_t n = recv(c->fd, rbuf, sizeof(rbuf), 0);
		const char *p;
		size_t len, used;
		if (n == 0)
			goto dead;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return;
			goto dead;
		}
		if (c->in_len) { /* glue onto the partial line we kept */
			append(&c->in, &c->in_len, &c->in_cap, rbuf, (size_t)n);
			p = c->in;
			len = c->in_len;
		} else {
			p = rbuf;
			len = (size_t)n;
		}
		used = process(c, p, len, &dead);
		if (dead)
			goto dead;
		if (p == c->in) {
			memmove(c->in, c->in + used, len - used);
			c->in_len = len - used;
		} else if (used < len) {
			append(&c->in, &c->in_len, &c->in_cap, p + used, len - used);
		}
		if (c->in_len > LINE_MAX_LEN && !memchr(c->in, '\n', c->in_len))
			goto dead; /* a "line" this long is abuse, not a request */
		if (c->out_len || c->zeros) {
			set_interest(c, 1);
			return;
		}
		if ((size_t)n < sizeof(rbuf))
			return; /* level-triggered: epoll tells us if more came */
	}
dead:
	conn_close(c);
}

static void on_accept(int lfd)
{
	for (int i = 0; i < 64; i++) {
		int one = 1;
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		struct conn *c;
		struct epoll_event ev;
		if (fd < 0) {
			if (errno == EAGAIN || errno == ECONNABORTED || errno == EINTR)
				return;
			perror("accept4"); /* EMFILE etc.: keep serving the rest */
			return;
		}
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		c = calloc(1, sizeof(*c));
		if (!c)
			die("calloc");
		c->fd = fd;
		ev.events = EPOLLIN;
		ev.data.ptr = c;
		if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
			die("epoll_ctl ADD");
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_in sin;
	socklen_t slen = sizeof(sin);
	struct epoll_event evs[512], lev;
	struct sigaction sa;
	int lfd, one = 1;
	static int listen_tag;

	if (argc != 2) {
		fprintf(stderr, "usage: %s PORT\n", argv[0]);
		return 2;
	}
	raise_nofile();
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (lfd < 0)
		die("socket");
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sin.sin_port = htons((unsigned short)atoi(argv[1]));
	if (bind(lfd, (struct sockaddr *)&sin, sizeof(sin)) < 0)
		die("bind");
	if (listen(lfd, 1024) < 0)
		die("listen");
	if (getsockname(lfd, (struct sockaddr *)&sin, &slen) < 0)
		die("getsockname");

	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (epfd < 0)
		die("epoll_create1");
	lev.events = EPOLLIN;
	lev.data.ptr = &listen_tag;
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev) < 0)
		die("epoll_ctl listen");

	printf("READY %d\n", ntohs(sin.sin_port));
	fflush(stdout);

	while (!stop) {
		int n = epoll_wait(epfd, evs, 512, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (int i = 0; i < n; i++) {
			if (evs[i].data.ptr == &listen_tag)
				on_accept(lfd);
			else
				on_event(evs[i].data.ptr);
		}
	}
	return 0;
}
