/*
 * A closed-loop load generator for the daemon's three protocols.
 *
 * Each connection behaves like one Postfix process: it sends one request,
 * waits for the whole reply, and sends the next.  One thread drives every
 * connection with epoll, so the generator costs a few microseconds of CPU
 * per request and is never the bottleneck (the benchmark proves that by
 * running it against a trivial responder in the same run).
 *
 *   loadgen --connect tcp:127.0.0.1:10001 --protocol socketmap \
 *           --requests FILE --conns 50 --duration 10 --warmup 2 \
 *           [--procs 2] [--pids 123,456] [--tag run1]
 *
 * FILE holds one request per line.  "\n", "\t" and "\\" are unescaped, and
 * "{n}" is replaced by a number unique within the run (for keys that must
 * miss every cache).  Connections take the lines in turn.
 *
 * Protocols: "socketmap" (the line is framed as a netstring, the reply is
 * one netstring), "policy" (the line, unescaped, is the attribute block
 * without its final empty line; the reply ends with an empty line), and
 * "sasl" (the Dovecot handshake first; the line is the base64 PLAIN
 * response, sent as "AUTH <id> PLAIN ... resp=<line>"; the reply is the OK
 * or FAIL line).
 *
 * It prints one JSON object: completed requests and the rate in the
 * measured window (after the warm-up), latency percentiles, the first word
 * of every reply counted, connection errors, its own CPU time, and for each
 * process in --pids the CPU seconds it used during the window and its RSS.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum proto { SOCKETMAP, POLICY, SASL };

/* Latency histogram: 10 us buckets up to 5 s, then one overflow bucket. */
#define BUCKET_US 10
#define NBUCKETS 500001

#define MAX_PIDS 64
#define NKINDS 8
static const char *kind_names[NKINDS] = {"OK", "NOTFOUND", "TEMP", "PERM", "DUNNO", "REJECT", "FAIL", "other"};

struct result {
	uint64_t completed;
	uint64_t errors;
	uint64_t kinds[NKINDS];
	uint32_t hist[NBUCKETS];
};

struct conn {
	int fd;
	int state; /* 0 connecting, 1 handshake (sasl), 2 waiting for reply */
	char *out;
	size_t outlen, outoff;
	char in[65536];
	size_t inlen;
	uint64_t sent_ns;
	unsigned long auth_id;
};

static enum proto protocol;
static char **lines;
static size_t nlines;
static uint64_t next_line;
static uint64_t unique_counter;
static unsigned proc_index, nprocs = 1;
static const char *tag = "";
static struct sockaddr_storage target;
static socklen_t target_len;
static int target_family;
static uint64_t measure_start, measure_end;
static struct result *res;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t t)
{
	uint64_t n = now_ns();
	if (t <= n)
		return;
	struct timespec ts = {.tv_sec = (time_t)((t - n) / 1000000000ull),
			      .tv_nsec = (long)((t - n) % 1000000000ull)};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static char *unescape(const char *s)
{
	size_t n = strlen(s);
	char *out = malloc(n + 1), *o = out;
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '\\' && i + 1 < n) {
			char c = s[++i];
			*o++ = c == 'n' ? '\n' : c == 't' ? '\t' : c;
		} else {
			*o++ = s[i];
		}
	}
	*o = 0;
	return out;
}

static void load_requests(const char *path)
{
	FILE *f = fopen(path, "r");
	if (!f)
		die(path);
	size_t cap = 16;
	lines = malloc(cap * sizeof(char *));
	char *line = NULL;
	size_t len = 0;
	ssize_t got;
	while ((got = getline(&line, &len, f)) >= 0) {
		while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r'))
			line[--got] = 0;
		if (got == 0)
			continue;
		if (nlines == cap)
			lines = realloc(lines, (cap *= 2) * sizeof(char *));
		lines[nlines++] = unescape(line);
	}
	free(line);
	fclose(f);
	if (nlines == 0) {
		fprintf(stderr, "loadgen: no requests in %s\n", path);
		exit(2);
	}
}

/* The payload of the next request, with "{n}" made unique. */
static size_t next_payload(char *buf, size_t cap)
{
	const char *tmpl = lines[next_line++ % nlines];
	const char *mark = strstr(tmpl, "{n}");
	if (!mark)
		return (size_t)snprintf(buf, cap, "%s", tmpl);
	uint64_t n = unique_counter++ * nprocs + proc_index;
	return (size_t)snprintf(buf, cap, "%.*s%s%llu%s", (int)(mark - tmpl), tmpl, tag,
				(unsigned long long)n, mark + 3);
}

static void build_request(struct conn *c)
{
	char payload[8192];
	size_t n = next_payload(payload, sizeof payload);
	free(c->out);
	c->out = malloc(n + 512);
	switch (protocol) {
	case SOCKETMAP:
		c->outlen = (size_t)sprintf(c->out, "%zu:%s,", n, payload);
		break;
	case POLICY:
		c->outlen = (size_t)sprintf(c->out, "%s\n\n", payload);
		break;
	case SASL:
		c->outlen = (size_t)sprintf(c->out,
					    "AUTH\t%lu\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\t"
					    "rip=127.0.0.1\tresp=%s\n",
					    ++c->auth_id, payload);
		break;
	}
	c->outoff = 0;
}

static int open_conn(struct conn *c, int ep)
{
	int fd = socket(target_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (fd < 0)
		die("socket");
	if (target_family == AF_INET) {
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	}
	if (connect(fd, (struct sockaddr *)&target, target_len) < 0 && errno != EINPROGRESS) {
		close(fd);
		return -1;
	}
	c->fd = fd;
	c->state = 0;
	c->inlen = 0;
	struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
		die("epoll_ctl");
	return 0;
}

static void want_write(struct conn *c, int ep, int on)
{
	struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
	epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void send_next(struct conn *c, int ep)
{
	build_request(c);
	c->state = 2;
	c->sent_ns = now_ns();
	ssize_t w = write(c->fd, c->out, c->outlen);
	if (w > 0)
		c->outoff = (size_t)w;
	if (c->outoff < c->outlen)
		want_write(c, ep, 1);
}

static void classify(const char *reply, size_t len)
{
	static const char *words[] = {"OK", "NOTFOUND", "TEMP", "PERM", "action=DUNNO", "action=REJECT", "FAIL"};
	for (int k = 0; k < 7; k++) {
		size_t wl = strlen(words[k]);
		if (len >= wl && memcmp(reply, words[k], wl) == 0 &&
		    (len == wl || reply[wl] == ' ' || reply[wl] == '\t' || reply[wl] == '\n')) {
			res->kinds[k]++;
			return;
		}
	}
	res->kinds[NKINDS - 1]++;
}

/*
 * Length of a complete reply at the start of the input buffer (0 when more
 * is needed); *body and *bodylen point at the reply text.
 */
static size_t complete_reply(struct conn *c, const char **body, size_t *bodylen)
{
	char *buf = c->in;
	size_t n = c->inlen;
	if (protocol == SOCKETMAP) {
		size_t len = 0, i = 0;
		while (i < n && buf[i] >= '0' && buf[i] <= '9')
			len = len * 10 + (size_t)(buf[i++] - '0');
		if (i == n)
			return 0;
		if (buf[i] != ':')
			return (size_t)-1;
		if (n < i + 1 + len + 1)
			return 0;
		*body = buf + i + 1;
		*bodylen = len;
		return i + 1 + len + 1;
	}
	if (protocol == POLICY) {
		char *end = memmem(buf, n, "\n\n", 2);
		if (!end)
			return 0;
		*body = buf;
		*bodylen = (size_t)(end - buf);
		return (size_t)(end - buf) + 2;
	}
	/* SASL: skip lines until an OK or FAIL line. */
	size_t start = 0;
	for (;;) {
		char *nl = memchr(buf + start, '\n', n - start);
		if (!nl)
			return 0;
		size_t linelen = (size_t)(nl - (buf + start));
		if ((linelen >= 3 && memcmp(buf + start, "OK\t", 3) == 0) ||
		    (linelen >= 5 && memcmp(buf + start, "FAIL\t", 5) == 0)) {
			*body = buf + start;
			*bodylen = linelen;
			return start + linelen + 1;
		}
		start += linelen + 1;
	}
}

static void record(uint64_t sent, uint64_t done)
{
	if (done < measure_start || done > measure_end)
		return;
	uint64_t us = (done - sent) / 1000;
	uint64_t b = us / BUCKET_US;
	if (b >= NBUCKETS)
		b = NBUCKETS - 1;
	res->hist[b]++;
	res->completed++;
}

static void drop_conn(struct conn *c, int ep)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	c->fd = -1;
	if (now_ns() >= measure_start && now_ns() <= measure_end)
		res->errors++;
}

static void run(unsigned nconns, uint64_t deadline)
{
	int ep = epoll_create1(0);
	if (ep < 0)
		die("epoll_create1");
	struct conn *conns = calloc(nconns, sizeof *conns);
	for (unsigned i = 0; i < nconns; i++) {
		conns[i].fd = -1;
		if (open_conn(&conns[i], ep) < 0)
			res->errors++;
	}
	struct epoll_event events[256];
	uint64_t last_retry = now_ns();
	while (now_ns() < deadline) {
		int n = epoll_wait(ep, events, 256, 50);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (int e = 0; e < n; e++) {
			struct conn *c = events[e].data.ptr;
			if (c->fd < 0)
				continue;
			uint32_t ev = events[e].events;
			if (c->state == 0 && (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
				int err = 0;
				socklen_t el = sizeof err;
				getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
				if (err) {
					drop_conn(c, ep);
					continue;
				}
				want_write(c, ep, 0);
				if (protocol == SASL) {
					char hello[64];
					int hl = snprintf(hello, sizeof hello, "VERSION\t1\t2\nCPID\t%d\n", getpid());
					if (write(c->fd, hello, (size_t)hl) != hl) {
						drop_conn(c, ep);
						continue;
					}
					c->state = 1;
				} else {
					send_next(c, ep);
				}
				continue;
			}
			if ((ev & EPOLLOUT) && c->state == 2 && c->outoff < c->outlen) {
				ssize_t w = write(c->fd, c->out + c->outoff, c->outlen - c->outoff);
				if (w > 0)
					c->outoff += (size_t)w;
				if (c->outoff == c->outlen)
					want_write(c, ep, 0);
			}
			if (!(ev & (EPOLLIN | EPOLLHUP | EPOLLERR)))
				continue;
			ssize_t r = read(c->fd, c->in + c->inlen, sizeof c->in - c->inlen);
			if (r <= 0) {
				if (r < 0 && errno == EAGAIN)
					continue;
				drop_conn(c, ep);
				continue;
			}
			c->inlen += (size_t)r;
			if (c->state == 1) {
				char *done = memmem(c->in, c->inlen, "DONE\n", 5);
				if (!done)
					continue;
				c->inlen = 0;
				send_next(c, ep);
				continue;
			}
			const char *body;
			size_t bodylen;
			size_t used = complete_reply(c, &body, &bodylen);
			if (used == (size_t)-1) {
				drop_conn(c, ep);
				continue;
			}
			if (used == 0) {
				if (c->inlen == sizeof c->in)
					drop_conn(c, ep);
				continue;
			}
			uint64_t t = now_ns();
			if (t >= measure_start && t <= measure_end)
				classify(body, bodylen);
			record(c->sent_ns, t);
			memmove(c->in, c->in + used, c->inlen - used);
			c->inlen -= used;
			send_next(c, ep);
		}
		/* Reopen dropped connections, as Postfix would. */
		uint64_t t = now_ns();
		if (t - last_retry > 100000000ull) {
			last_retry = t;
			for (unsigned i = 0; i < nconns; i++)
				if (conns[i].fd < 0 && open_conn(&conns[i], ep) < 0)
					res->errors++;
		}
	}
	for (unsigned i = 0; i < nconns; i++)
		if (conns[i].fd >= 0)
			close(conns[i].fd);
	close(ep);
}

static void parse_target(const char *spec)
{
	memset(&target, 0, sizeof target);
	if (strncmp(spec, "unix:", 5) == 0) {
		struct sockaddr_un *un = (struct sockaddr_un *)&target;
		un->sun_family = AF_UNIX;
		snprintf(un->sun_path, sizeof un->sun_path, "%s", spec + 5);
		target_len = sizeof *un;
		target_family = AF_UNIX;
		return;
	}
	if (strncmp(spec, "tcp:", 4) == 0)
		spec += 4;
	char host[256];
	const char *colon = strrchr(spec, ':');
	if (!colon) {
		fprintf(stderr, "loadgen: --connect tcp:HOST:PORT or unix:PATH\n");
		exit(2);
	}
	snprintf(host, sizeof host, "%.*s", (int)(colon - spec), spec);
	struct sockaddr_in *in = (struct sockaddr_in *)&target;
	in->sin_family = AF_INET;
	in->sin_port = htons((uint16_t)atoi(colon + 1));
	if (inet_pton(AF_INET, host, &in->sin_addr) != 1) {
		fprintf(stderr, "loadgen: %s is not an IPv4 address\n", host);
		exit(2);
	}
	target_len = sizeof *in;
	target_family = AF_INET;
}

/* utime + stime of a process, in seconds; negative when it is gone. */
static double proc_cpu(int pid)
{
	char path[64], buf[2048];
	snprintf(path, sizeof path, "/proc/%d/stat", pid);
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	char *p = strrchr(buf, ')');
	if (!p)
		return -1;
	unsigned long utime = 0, stime = 0;
	/* Fields after the command: state(3) ... utime(14) stime(15). */
	int field = 2;
	for (char *tok = strtok(p + 1, " "); tok; tok = strtok(NULL, " ")) {
		field++;
		if (field == 14)
			utime = strtoul(tok, NULL, 10);
		if (field == 15) {
			stime = strtoul(tok, NULL, 10);
			break;
		}
	}
	return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

static long proc_rss_kb(int pid)
{
	char path[64], line[256];
	snprintf(path, sizeof path, "/proc/%d/status", pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	long kb = -1;
	while (fgets(line, sizeof line, f))
		if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
			break;
	fclose(f);
	return kb;
}

static double percentile(const struct result *r, double q)
{
	if (r->completed == 0)
		return 0;
	uint64_t want = (uint64_t)((double)r->completed * q);
	if (want >= r->completed)
		want = r->completed - 1;
	uint64_t seen = 0;
	for (size_t b = 0; b < NBUCKETS; b++) {
		seen += r->hist[b];
		if (seen > want)
			return (double)((b + 1) * BUCKET_US) / 1000.0;
	}
	return (double)(NBUCKETS * BUCKET_US) / 1000.0;
}

static void usage(void)
{
	fprintf(stderr, "usage: loadgen --connect tcp:HOST:PORT|unix:PATH --protocol socketmap|policy|sasl\n"
			"               --requests FILE [--conns N] [--duration S] [--warmup S]\n"
			"               [--procs P] [--pids PID,PID] [--tag TEXT]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *connect_spec = NULL, *requests = NULL, *pids_arg = "";
	unsigned nconns = 10;
	double duration = 10, warmup = 2;
	protocol = SOCKETMAP;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!v)
			usage();
		if (!strcmp(a, "--connect"))
			connect_spec = v;
		else if (!strcmp(a, "--requests"))
			requests = v;
		else if (!strcmp(a, "--conns"))
			nconns = (unsigned)atoi(v);
		else if (!strcmp(a, "--duration"))
			duration = atof(v);
		else if (!strcmp(a, "--warmup"))
			warmup = atof(v);
		else if (!strcmp(a, "--procs"))
			nprocs = (unsigned)atoi(v);
		else if (!strcmp(a, "--pids"))
			pids_arg = v;
		else if (!strcmp(a, "--tag"))
			tag = v;
		else if (!strcmp(a, "--protocol")) {
			if (!strcmp(v, "socketmap"))
				protocol = SOCKETMAP;
			else if (!strcmp(v, "policy"))
				protocol = POLICY;
			else if (!strcmp(v, "sasl"))
				protocol = SASL;
			else
				usage();
		} else
			usage();
		i++;
	}
	if (!connect_spec || !requests || nconns == 0 || nprocs == 0)
		usage();
	if (nprocs > nconns)
		nprocs = nconns;
	signal(SIGPIPE, SIG_IGN);
	parse_target(connect_spec);
	load_requests(requests);

	int pids[MAX_PIDS], npids = 0;
	for (const char *p = pids_arg; *p && npids < MAX_PIDS;) {
		pids[npids++] = atoi(p);
		p = strchr(p, ',');
		if (!p)
			break;
		p++;
	}

	uint64_t start = now_ns();
	measure_start = start + (uint64_t)(warmup * 1e9);
	measure_end = measure_start + (uint64_t)(duration * 1e9);
	uint64_t deadline = measure_end + 50000000ull;

	/* Each worker process fills its own slot of a shared mapping. */
	struct result *all = mmap(NULL, nprocs * sizeof *all, PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (all == MAP_FAILED)
		die("mmap");
	int children[MAX_PIDS];
	if (nprocs > MAX_PIDS)
		nprocs = MAX_PIDS;
	for (unsigned p = 0; p < nprocs; p++) {
		pid_t child = fork();
		if (child < 0)
			die("fork");
		if (child == 0) {
			proc_index = p;
			res = &all[p];
			run(nconns / nprocs + (p < nconns % nprocs ? 1 : 0), deadline);
			_exit(0);
		}
		children[p] = child;
	}

	/* The parent only watches: CPU of every process over the window, peak RSS. */
	double cpu_before[MAX_PIDS], cpu_after[MAX_PIDS], gen_before = 0, gen_after = 0;
	long rss_peak[MAX_PIDS];
	for (int i = 0; i < npids; i++)
		rss_peak[i] = 0;
	sleep_until(measure_start);
	for (int i = 0; i < npids; i++)
		cpu_before[i] = proc_cpu(pids[i]);
	for (unsigned p = 0; p < nprocs; p++)
		gen_before += proc_cpu(children[p]);
	while (now_ns() < measure_end) {
		uint64_t step = now_ns() + 250000000ull;
		sleep_until(step < measure_end ? step : measure_end);
		for (int i = 0; i < npids; i++) {
			long kb = proc_rss_kb(pids[i]);
			if (kb > rss_peak[i])
				rss_peak[i] = kb;
		}
	}
	for (int i = 0; i < npids; i++)
		cpu_after[i] = proc_cpu(pids[i]);
	for (unsigned p = 0; p < nprocs; p++)
		gen_after += proc_cpu(children[p]);
	for (unsigned p = 0; p < nprocs; p++)
		waitpid(children[p], NULL, 0);

	struct result *total = calloc(1, sizeof *total);
	for (unsigned p = 0; p < nprocs; p++) {
		total->completed += all[p].completed;
		total->errors += all[p].errors;
		for (int k = 0; k < NKINDS; k++)
			total->kinds[k] += all[p].kinds[k];
		for (size_t b = 0; b < NBUCKETS; b++)
			total->hist[b] += all[p].hist[b];
	}
	printf("{\"requests\": %llu, \"seconds\": %.3f, \"rps\": %.1f, \"p50_ms\": %.3f, "
	       "\"p99_ms\": %.3f, \"max_ms\": %.3f, \"errors\": %llu, \"conns\": %u, "
	       "\"loadgen_cpu_s\": %.3f, \"replies\": {",
	       (unsigned long long)total->completed, duration, (double)total->completed / duration,
	       percentile(total, 0.50), percentile(total, 0.99), percentile(total, 1.0),
	       (unsigned long long)total->errors, nconns, gen_after - gen_before);
	for (int k = 0; k < NKINDS; k++)
		printf("%s\"%s\": %llu", k ? ", " : "", kind_names[k], (unsigned long long)total->kinds[k]);
	printf("}, \"processes\": [");
	for (int i = 0; i < npids; i++)
		printf("%s{\"pid\": %d, \"cpu_s\": %.3f, \"rss_kb\": %ld}", i ? ", " : "", pids[i],
		       cpu_after[i] >= 0 && cpu_before[i] >= 0 ? cpu_after[i] - cpu_before[i] : -1.0,
		       rss_peak[i]);
	printf("]}\n");
	return 0;
}
