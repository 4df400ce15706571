/*
 * loadgen: load generator for the bench protocol, loopback only.
 *
 *   loadgen --port P --mode pingpong|bulk|idle --conns C [options]
 *
 * pingpong  each connection sends a --msg-size line and waits for its echo
 *           before sending the next; after --warmup seconds the counters
 *           reset and the next --duration seconds are measured.
 * bulk      each connection sends "bulk N\n" (N = --bulk-size) and reads the
 *           N bytes, until --bulk-total bytes were received over all
 *           connections (or --duration elapsed); each connection then sends
 *           one echo line to prove no stray bytes followed.
 * idle      opens C connections, each sends one short line and reads its
 *           echo (so the server really accepted and served it), then prints
 *           {"event": "holding", ...}, waits for a line or EOF on stdin (at
 *           most --hold seconds), closes everything and reports.
 *
 * With --server-pid, the server's CPU time (utime+stime, read in ns from
 * /proc/PID/task/ * /schedstat, in ticks from /proc/PID/stat) is sampled at
 * the exact edges of the measured window: doing it here rather than in the
 * harness keeps pipe and scheduling delays out of the CPU-per-request figure.
 * A server of several processes (a master and its workers) is given as a
 * comma-separated list, or --server-pid repeated: its CPU time is the sum.
 *
 * The last line on stdout is one JSON object with the results; progress and
 * errors go to stderr.  Exit status 0 on success, 1 on any protocol error.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum mode { PINGPONG, BULK, IDLE };
#define MAX_PIDS 64
enum state { CONNECTING, HELLO, READY, WAITING, FINAL, DONE };

struct conn {
	int fd;
	enum state st;
	size_t got;          /* bytes of the current response received */
	size_t want;         /* bytes the current response should have */
	uint64_t t_sent;     /* ns, when the current request went out */
	uint64_t reqs_left;  /* bulk: requests still to send */
};

static struct {
	int port;
	enum mode mode;
	int conns;
	double duration, warmup, hold, timeout;
	size_t msg_size;
	uint64_t bulk_size, bulk_total;
	long server_pid[MAX_PIDS];
	int n_pids;
	int max_inflight;
} opt = {
	.port = 0, .mode = PINGPONG, .conns = 1, .duration = 5.0,
	.warmup = 1.0, .hold = 60.0, .timeout = 300.0, .msg_size = 64,
	.bulk_size = 1 << 20, .bulk_total = 256ULL << 20, .n_pids = 0,
	.max_inflight = 128,
};

static struct conn *conns;
static int epfd;
static char *msg;           /* the pingpong request line */
static char scratch[256 * 1024];
static const char hello[] = "hello idle\n";
static const char final_line[] = "bulk-done\n";

/* results */
static uint32_t *lat;       /* latencies in ns of requests in the window */
static size_t nlat, lat_cap;
static uint64_t completed, bytes_in;
static int measuring;
static uint64_t t_window_start, t_window_end, t_last_bulk;
struct cpu_sample { double sched, stat; }; /* seconds, -1: unknown */

static struct cpu_sample cpu_start = {-1, -1}, cpu_end = {-1, -1};
static int n_connected, n_inflight_connects, n_next_conn, n_held, n_done;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void fail(const char *fmt, const char *arg)
{
	fprintf(stderr, "loadgen: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n");
	printf("{\"error\": \"");
	printf(fmt, arg);
	printf("\"}\n");
	exit(1);
}

static void fail_errno(const char *what)
{
	char buf[256];
	snprintf(buf, sizeof(buf), "%s: %s", what, strerror(errno));
	fail("%s", buf);
}

/* Server CPU seconds from utime+stime in /proc/PID/stat (all threads, in
 * clock ticks: 10 ms on most kernels), or -1. */
static double server_cpu_stat(long pid)
{
	char path[64], buf[2048];
	unsigned long long ut, st;
	FILE *f;
	char *p;
	size_t n;
	snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = 0;
	/* comm may contain spaces and parens: fields restart after the last ')' */
	p = strrchr(buf, ')');
	if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
			 &ut, &st) != 2)
		return -1;
	return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* The same quantity in nanoseconds: the sum over the server's threads of
 * the first field of /proc/PID/task/TID/schedstat (time spent on a CPU).
 * A 256 MiB bulk run on the C server lasts ~0.1 s, i.e. ~10 clock ticks,
 * too coarse for a per-request figure; this is exact.  -1 if unavailable. */
static double server_cpu_sched(long pid)
{
	char path[320];
	DIR *d;
	struct dirent *e;
	double total = 0;
	int found = 0;
	snprintf(path, sizeof(path), "/proc/%ld/task", pid);
	d = opendir(path);
	if (!d)
		return -1;
	while ((e = readdir(d))) {
		unsigned long long ns;
		FILE *f;
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/proc/%ld/task/%s/schedstat",
			 pid, e->d_name);
		f = fopen(path, "r");
		if (!f)
			continue;
		if (fscanf(f, "%llu", &ns) == 1) {
			total += (double)ns / 1e9;
			found = 1;
		}
		fclose(f);
	}
	closedir(d);
	return found ? total : -1;
}

static struct cpu_sample server_cpu(void)
{
	struct cpu_sample s = {-1, -1};
	/* the sum over the server's processes; -1 if any cannot be read */
	for (int i = 0; i < opt.n_pids; i++) {
		double sched = server_cpu_sched(opt.server_pid[i]);
		double stat = server_cpu_stat(opt.server_pid[i]);
		if (i == 0) {
			s.sched = sched;
			s.stat = stat;
			continue;
		}
		s.sched = (s.sched >= 0 && sched >= 0) ? s.sched + sched : -1;
		s.stat = (s.stat >= 0 && stat >= 0) ? s.stat + stat : -1;
	}
	return s;
}

static void raise_nofile(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 &&
	    rl.rlim_cur < (rlim_t)opt.conns + 16)
		fprintf(stderr, "loadgen: RLIMIT_NOFILE %llu < %d connections\n",
			(unsigned long long)rl.rlim_cur, opt.conns);
}

static void record_latency(uint64_t ns)
{
	if (nlat == lat_cap) {
		lat_cap = lat_cap ? lat_cap * 2 : 1 << 16;
		lat = realloc(lat, lat_cap * sizeof(*lat));
		if (!lat)
			fail("%s", "out of memory for latencies");
	}
	lat[nlat++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static void ctl(struct conn *c, int op, uint32_t events)
{
	struct epoll_event ev = {.events = events, .data.ptr = c};
	if (epoll_ctl(epfd, op, c->fd, &ev) < 0)
		fail_errno("epoll_ctl");
}

/* Requests are tiny and the protocol is strictly request/response, so the
 * socket buffer is always empty when we send: a short send is an error. */
static void send_all(struct conn *c, const char *p, size_t n)
{
	while (n) {
		ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			fail_errno("send");
		p += w;
		n -= (size_t)w;
	}
}

static void send_request(struct conn *c)
{
	char line[64];
	int n;
	c->got = 0;
	c->t_sent = now_ns();
	switch (opt.mode) {
	case PINGPONG:
		c->want = opt.msg_size;
		send_all(c, msg, opt.msg_size);
		break;
	case BULK:
		c->want = opt.bulk_size;
		c->reqs_left--;
		n = snprintf(line, sizeof(line), "bulk %llu\n",
			     (unsigned long long)opt.bulk_size);
		send_all(c, line, (size_t)n);
		break;
	case IDLE:
		break;
	}
	c->st = WAITING;
}

static void start_connect(struct conn *c)
{
	struct sockaddr_in sin;
	int one = 1;
	c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd < 0)
		fail_errno("socket");
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sin.sin_port = htons((unsigned short)opt.port);
	if (connect(c->fd, (struct sockaddr *)&sin, sizeof(sin)) < 0 &&
	    errno != EINPROGRESS)
		fail_errno("connect");
	c->st = CONNECTING;
	ctl(c, EPOLL_CTL_ADD, EPOLLOUT);
	n_inflight_connects++;
}

/* Keeps at most max_inflight handshakes (and idle hellos) in flight, so a
 * small listen backlog is not overrun into SYN retransmits (1 s each). */
static void top_up_connects(void)
{
	while (n_next_conn < opt.conns && n_inflight_connects < opt.max_inflight)
		start_connect(&conns[n_next_conn++]);
}

static void on_connected(struct conn *c)
{
	int err = 0;
	socklen_t len = sizeof(err);
	if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
		errno = err;
		fail_errno("connect (async)");
	}
	ctl(c, EPOLL_CTL_MOD, EPOLLIN);
	n_connected++;
	if (opt.mode == IDLE) {
		c->st = HELLO;
		c->got = 0;
		c->want = sizeof(hello) - 1;
		send_all(c, hello, c->want);
	} else {
		n_inflight_connects--;
		c->st = READY;
	}
}

static void on_response_done(struct conn *c, uint64_t t)
{
	if (opt.mode == PINGPONG) {
		if (measuring == 1) {
			completed++;
			record_latency(t - c->t_sent);
		}
		if (measuring < 2)
			send_request(c);
		else
			c->st = DONE;
		return;
	}
	/* BULK */
	completed++;
	bytes_in += c->want;
	record_latency(t - c->t_sent);
	t_last_bulk = t;
	if (c->reqs_left > 0 && measuring == 1) {
		send_request(c);
	} else {
		c->st = FINAL;
		c->got = 0;
		c->want = sizeof(final_line) - 1;
		send_all(c, final_line, c->want);
	}
}

/* What the bytes of the current response must be; NULL: bulk, only counted. */
static const char *expected(const struct conn *c)
{
	switch (c->st) {
	case HELLO: return hello;
	case FINAL: return final_line;
	case WAITING: return opt.mode == PINGPONG ? msg : NULL;
	default: fail("%s", "data in unexpected state");
	}
	return NULL;
}

static void on_readable(struct conn *c)
{
	const char *exp = expected(c);
	uint64_t t;
	while (c->got < c->want) {
		size_t room = c->want - c->got;
		ssize_t n;
		if (room > sizeof(scratch))
			room = sizeof(scratch);
		n = recv(c->fd, scratch, room, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return;
		if (n == 0)
			fail("%s", "server closed the connection");
		if (n < 0)
			fail_errno("recv");
		/* checked as it arrives: conns share one scratch buffer */
		if (exp && memcmp(scratch, exp + c->got, (size_t)n) != 0)
			fail("%s", "echo mismatch");
		c->got += (size_t)n;
	}
	t = now_ns();
	switch (c->st) {
	case HELLO:
		c->st = DONE;
		n_held++;
		n_inflight_connects--;
		break;
	case WAITING:
		on_response_done(c, t);
		break;
	default: /* FINAL */
		c->st = DONE;
		n_done++;
		break;
	}
	/* a response must not be followed by anything we did not ask for */
	if (c->st == DONE && recv(c->fd, scratch, 1, MSG_DONTWAIT) > 0)
		fail("%s", "unexpected extra bytes from server");
}

static void poll_once(int timeout_ms)
{
	struct epoll_event evs[1024];
	int n = epoll_wait(epfd, evs, 1024, timeout_ms);
	if (n < 0) {
		if (errno == EINTR)
			return;
		fail_errno("epoll_wait");
	}
	for (int i = 0; i < n; i++) {
		struct conn *c = evs[i].data.ptr;
		if (c->st == CONNECTING)
			on_connected(c);
		else
			on_readable(c);
	}
}

static void connect_all(uint64_t deadline)
{
	top_up_connects();
	while (n_connected < opt.conns ||
	       (opt.mode == IDLE && n_held < opt.conns)) {
		if (now_ns() > deadline)
			fail("%s", "timed out while connecting");
		poll_once(100);
		top_up_connects();
	}
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

static double pct_us(double p)
{
	size_t i;
	if (nlat == 0)
		return 0;
	i = (size_t)(p * (double)(nlat - 1) + 0.5);
	return lat[i] / 1000.0;
}

static void close_all(void)
{
	for (int i = 0; i < opt.conns; i++)
		if (conns[i].fd > 0)
			close(conns[i].fd);
}

static double delta(double a, double b)
{
	return (a >= 0 && b >= 0) ? b - a : -1;
}

static void report(void)
{
	double elapsed = (double)(t_window_end - t_window_start) / 1e9;
	double sched = delta(cpu_start.sched, cpu_end.sched);
	double stat = delta(cpu_start.stat, cpu_end.stat);
	/* prefer the nanosecond source; utime+stime is the fallback */
	double cpu = sched >= 0 ? sched : stat;
	const char *mode = opt.mode == PINGPONG ? "pingpong"
			 : opt.mode == BULK   ? "bulk" : "idle";
	qsort(lat, nlat, sizeof(*lat), cmp_u32);
	printf("{\"mode\": \"%s\", \"conns\": %d, \"requests\": %llu, "
	       "\"elapsed_s\": %.6f, \"rps\": %.1f, \"bytes\": %llu, "
	       "\"mb_per_s\": %.2f, \"p50_us\": %.1f, \"p99_us\": %.1f, "
	       "\"server_cpu_s\": %.6f, \"cpu_source\": \"%s\", "
	       "\"server_cpu_stat_s\": %.3f, \"cpu_us_per_req\": %.3f, "
	       "\"held\": %d}\n",
	       mode, opt.conns, (unsigned long long)completed, elapsed,
	       elapsed > 0 ? (double)completed / elapsed : 0.0,
	       (unsigned long long)bytes_in,
	       elapsed > 0 ? (double)bytes_in / elapsed / 1e6 : 0.0,
	       pct_us(0.50), pct_us(0.99), cpu,
	       sched >= 0 ? "schedstat" : stat >= 0 ? "stat" : "none", stat,
	       (cpu >= 0 && completed) ? cpu * 1e6 / (double)completed : -1.0,
	       n_held);
	fflush(stdout);
}

static void run_pingpong(uint64_t deadline)
{
	uint64_t t_end;
	connect_all(deadline);
	measuring = 0;
	for (int i = 0; i < opt.conns; i++)
		send_request(&conns[i]);
	t_end = now_ns() + (uint64_t)(opt.warmup * 1e9);
	while (now_ns() < t_end)
		poll_once(10);
	measuring = 1;
	cpu_start = server_cpu();
	t_window_start = now_ns();
	t_end = t_window_start + (uint64_t)(opt.duration * 1e9);
	while (now_ns() < t_end)
		poll_once(10);
	t_window_end = now_ns();
	cpu_end = server_cpu();
	measuring = 2;
}

static void run_bulk(uint64_t deadline)
{
	uint64_t total_reqs = opt.bulk_total / opt.bulk_size, t_cap;
	if (total_reqs == 0)
		total_reqs = 1;
	connect_all(deadline);
	for (int i = 0; i < opt.conns; i++)
		conns[i].reqs_left = total_reqs / (uint64_t)opt.conns +
				     ((uint64_t)i < total_reqs % (uint64_t)opt.conns);
	measuring = 1;
	cpu_start = server_cpu();
	t_window_start = now_ns();
	t_cap = t_window_start + (uint64_t)(opt.duration * 1e9);
	for (int i = 0; i < opt.conns; i++) {
		if (conns[i].reqs_left) {
			send_request(&conns[i]);
		} else {
			conns[i].st = DONE;
			n_done++;
		}
	}
	/* the window ends when the last requested byte arrived (or at the
	 * cap, after which only the requests in flight are finished) */
	while (n_done < opt.conns) {
		if (measuring == 1 && now_ns() > t_cap) {
			fprintf(stderr, "loadgen: bulk duration cap reached\n");
			measuring = 2;
		}
		if (now_ns() > deadline)
			fail("%s", "timed out in bulk mode");
		poll_once(10);
	}
	cpu_end = server_cpu();
	t_window_end = t_last_bulk ? t_last_bulk : now_ns();
}

static void run_idle(uint64_t deadline)
{
	struct pollfd pfd = {.fd = 0, .events = POLLIN};
	char buf[256];
	t_window_start = now_ns();
	cpu_start = server_cpu();
	connect_all(deadline);
	t_window_end = now_ns();
	cpu_end = server_cpu();
	completed = (uint64_t)n_held;
	printf("{\"event\": \"holding\", \"held\": %d}\n", n_held);
	fflush(stdout);
	/* any line or EOF on stdin releases the connections */
	if (poll(&pfd, 1, (int)(opt.hold * 1000)) > 0)
		(void)!read(0, buf, sizeof(buf));
}

static void usage(void)
{
	fprintf(stderr,
		"usage: loadgen --port P --mode pingpong|bulk|idle --conns C\n"
		"  [--duration S] [--warmup S] [--msg-size B] [--bulk-size B]\n"
		"  [--bulk-total B] [--hold S] [--timeout S] [--server-pid PID[,PID...]]\n"
		"  [--max-inflight N]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option lopts[] = {
		{"port", required_argument, 0, 'p'},
		{"mode", required_argument, 0, 'm'},
		{"conns", required_argument, 0, 'c'},
		{"duration", required_argument, 0, 'd'},
		{"warmup", required_argument, 0, 'w'},
		{"msg-size", required_argument, 0, 's'},
		{"bulk-size", required_argument, 0, 'n'},
		{"bulk-total", required_argument, 0, 't'},
		{"hold", required_argument, 0, 'H'},
		{"timeout", required_argument, 0, 'T'},
		{"server-pid", required_argument, 0, 'P'},
		{"max-inflight", required_argument, 0, 'i'},
		{0, 0, 0, 0},
	};
	int ch;
	uint64_t deadline;
	while ((ch = getopt_long(argc, argv, "", lopts, NULL)) != -1) {
		switch (ch) {
		case 'p': opt.port = atoi(optarg); break;
		case 'm':
			if (!strcmp(optarg, "pingpong")) opt.mode = PINGPONG;
			else if (!strcmp(optarg, "bulk")) opt.mode = BULK;
			else if (!strcmp(optarg, "idle")) opt.mode = IDLE;
			else usage();
			break;
		case 'c': opt.conns = atoi(optarg); break;
		case 'd': opt.duration = atof(optarg); break;
		case 'w': opt.warmup = atof(optarg); break;
		case 's': opt.msg_size = (size_t)atol(optarg); break;
		case 'n': opt.bulk_size = strtoull(optarg, NULL, 10); break;
		case 't': opt.bulk_total = strtoull(optarg, NULL, 10); break;
		case 'H': opt.hold = atof(optarg); break;
		case 'T': opt.timeout = atof(optarg); break;
		case 'P':
			for (char *tok = strtok(optarg, ","); tok;
			     tok = strtok(NULL, ",")) {
				long pid = atol(tok);
				if (opt.n_pids == MAX_PIDS)
					usage();
				if (pid > 0)
					opt.server_pid[opt.n_pids++] = pid;
			}
			break;
		case 'i': opt.max_inflight = atoi(optarg); break;
		default: usage();
		}
	}
	if (opt.port <= 0 || opt.conns <= 0 || opt.msg_size < 2 ||
	    opt.msg_size > sizeof(scratch) || opt.bulk_size == 0 ||
	    opt.max_inflight <= 0)
		usage();
	signal(SIGPIPE, SIG_IGN);
	raise_nofile();

	/* a printable line that cannot be mistaken for "bulk N" */
	msg = malloc(opt.msg_size);
	for (size_t i = 0; i + 1 < opt.msg_size; i++)
		msg[i] = (char)('a' + i % 26);
	msg[opt.msg_size - 1] = '\n';

	conns = calloc((size_t)opt.conns, sizeof(*conns));
	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (!conns || !msg || epfd < 0)
		fail_errno("setup");
	deadline = now_ns() + (uint64_t)(opt.timeout * 1e9);

	switch (opt.mode) {
	case PINGPONG: run_pingpong(deadline); break;
	case BULK: run_bulk(deadline); break;
	case IDLE: run_idle(deadline); break;
	}
	close_all();
	report();
	return 0;
}
