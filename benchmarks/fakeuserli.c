/*
 * A fast fake Userli API for the benchmarks.
 *
 * The test suite's fake (tests/fake_userli.py) follows the API contract in
 * every detail; under benchmark load it spends about 0.11 ms of CPU per
 * request, more than half of what the daemon spends on a cache miss, and
 * takes it from the daemon on the same two cores.  This one answers the
 * same endpoints with the same shapes and status codes, over HTTP/1.1
 * keep-alive, holds every answer back by a fixed latency (as a real Userli
 * behind PHP would), and uses about 14 microseconds of CPU per request.
 *
 *   fakeuserli --port PORT --latency SECONDS --token TOKEN [--allow-anonymous]
 *
 * Its data is made of rules, so that benchmarks can ask for an unbounded
 * number of distinct keys that all exist:
 *   domain      true for example.org and every *.example.org
 *   mailbox     true for user*@example.org, quota*@..., unlimited*@...
 *   alias       alias*@example.org -> ["user1@example.org"], else []
 *   senders     a mailbox -> [itself], else []
 *   smtp_quota  quota*@ -> {"per_hour": 1000000, "per_day": 10000000},
 *               unlimited*@ and user*@ -> {"per_hour": 0, "per_day": 0},
 *               anything else 404 {"error": "User not found"}
 *   auth        a mailbox with the password "secret" -> 200 success,
 *               else 401 {"message": "authentication failed"}
 * A request without the bearer token is answered 401 unless
 * --allow-anonymous (for peers such as podop that send none).
 * GET /counts answers how many requests each endpoint has received so far
 * (a JSON object, endpoint -> count), so a benchmark can say how many
 * calls reached Userli per message.
 * Prints "listening on http://127.0.0.1:PORT" once it accepts.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FDS 65536
#define INBUF 16384

struct conn {
	unsigned gen;
	int open;
	size_t inlen;
	char in[INBUF];
};

struct pending {
	int fd;
	unsigned gen;
	uint64_t due;
	char *data;
	size_t len;
	int close_after;
};

static struct conn *conns[MAX_FDS];
static struct pending *queue;
static size_t qhead, qtail, qcap;
static uint64_t latency_ns;
static const char *token = "benchmark-token";
static int allow_anonymous;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void push(struct pending p)
{
	if (qtail - qhead == qcap) {
		size_t ncap = qcap ? qcap * 2 : 1024;
		struct pending *nq = malloc(ncap * sizeof *nq);
		for (size_t i = 0; i < qtail - qhead; i++)
			nq[i] = queue[(qhead + i) % qcap];
		free(queue);
		queue = nq;
		qtail -= qhead;
		qhead = 0;
		qcap = ncap;
	}
	queue[qtail++ % qcap] = p;
}

static void close_conn(int fd, int ep)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
	close(fd);
	conns[fd]->open = 0;
	conns[fd]->gen++;
	conns[fd]->inlen = 0;
}

static void urldecode(const char *s, size_t n, char *out, size_t cap)
{
	size_t o = 0;
	for (size_t i = 0; i < n && o + 1 < cap; i++) {
		if (s[i] == '%' && i + 2 < n) {
			char hex[3] = {s[i + 1], s[i + 2], 0};
			out[o++] = (char)strtol(hex, NULL, 16);
			i += 2;
		} else {
			out[o++] = s[i];
		}
	}
	out[o] = 0;
}

static int starts(const char *s, const char *prefix)
{
	return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* Whether addr is one of the rule-made mailboxes. */
static int is_mailbox(const char *addr)
{
	const char *at = strchr(addr, '@');
	if (!at || strcmp(at + 1, "example.org") != 0)
		return 0;
	return starts(addr, "user") || starts(addr, "quota") || starts(addr, "unlimited");
}

static int is_domain(const char *name)
{
	size_t n = strlen(name);
	return strcmp(name, "example.org") == 0 || (n > 12 && strcmp(name + n - 12, ".example.org") == 0);
}

/* Find a JSON string member's value (enough for {"email": ..., "password": ...}). */
static int json_field(const char *body, const char *name, char *out, size_t cap)
{
	char pat[64];
	snprintf(pat, sizeof pat, "\"%s\"", name);
	const char *p = strstr(body, pat);
	if (!p)
		return 0;
	p = strchr(p + strlen(pat), '"');
	if (!p)
		return 0;
	p++;
	size_t o = 0;
	while (*p && *p != '"' && o + 1 < cap) {
		if (*p == '\\' && p[1])
			p++;
		out[o++] = *p++;
	}
	out[o] = 0;
	return 1;
}

static const char *const endpoints[] = {"alias", "domain", "mailbox", "senders", "smtp_quota", "auth"};
#define ENDPOINTS (sizeof endpoints / sizeof endpoints[0])
static unsigned long counts[ENDPOINTS];

/* Count a request to /api/postfix/<endpoint>[/...]. */
static void count(const char *rest)
{
	size_t n = strcspn(rest, "/?");
	for (size_t i = 0; i < ENDPOINTS; i++)
		if (strlen(endpoints[i]) == n && strncmp(rest, endpoints[i], n) == 0)
			counts[i]++;
}

static int answer_counts(char *json, size_t cap)
{
	size_t o = (size_t)snprintf(json, cap, "{");
	for (size_t i = 0; i < ENDPOINTS && o < cap; i++)
		o += (size_t)snprintf(json + o, cap - o, "%s\"%s\": %lu", i ? ", " : "", endpoints[i],
				      counts[i]);
	if (o < cap)
		snprintf(json + o, cap - o, "}");
	return 200;
}

static int answer(const char *method, const char *path, const char *body, char *json, size_t cap)
{
	static const char prefix[] = "/api/postfix/";
	if (strncmp(path, prefix, sizeof prefix - 1) != 0)
		goto notfound;
	const char *rest = path + sizeof prefix - 1;
	count(rest);
	if (strcmp(rest, "auth") == 0 && strcmp(method, "POST") == 0) {
		char email[512], password[512];
		if (!json_field(body, "email", email, sizeof email) ||
		    !json_field(body, "password", password, sizeof password) || !*email || !*password) {
			snprintf(json, cap, "{\"title\": \"Validation Failed\", \"status\": 422}");
			return 422;
		}
		if (is_mailbox(email) && strcmp(password, "secret") == 0) {
			snprintf(json, cap, "{\"message\": \"success\"}");
			return 200;
		}
		snprintf(json, cap, "{\"message\": \"authentication failed\"}");
		return 401;
	}
	const char *slash = strchr(rest, '/');
	if (!slash || strcmp(method, "GET") != 0)
		goto notfound;
	char endpoint[32], key[1024];
	snprintf(endpoint, sizeof endpoint, "%.*s", (int)(slash - rest), rest);
	const char *q = strchr(slash + 1, '?');
	urldecode(slash + 1, q ? (size_t)(q - slash - 1) : strlen(slash + 1), key, sizeof key);
	if (!strcmp(endpoint, "domain")) {
		snprintf(json, cap, is_domain(key) ? "true" : "false");
		return 200;
	}
	if (!strcmp(endpoint, "mailbox")) {
		snprintf(json, cap, is_mailbox(key) ? "true" : "false");
		return 200;
	}
	if (!strcmp(endpoint, "alias")) {
		const char *at = strchr(key, '@');
		snprintf(json, cap, starts(key, "alias") && at && !strcmp(at + 1, "example.org")
					? "[\"user1@example.org\"]"
					: "[]");
		return 200;
	}
	if (!strcmp(endpoint, "senders")) {
		if (is_mailbox(key))
			snprintf(json, cap, "[\"%s\"]", key);
		else
			snprintf(json, cap, "[]");
		return 200;
	}
	if (!strcmp(endpoint, "smtp_quota")) {
		if (!is_mailbox(key)) {
			snprintf(json, cap, "{\"error\": \"User not found\"}");
			return 404;
		}
		if (starts(key, "quota"))
			snprintf(json, cap, "{\"per_hour\": 1000000, \"per_day\": 10000000}");
		else
			snprintf(json, cap, "{\"per_hour\": 0, \"per_day\": 0}");
		return 200;
	}
notfound:
	snprintf(json, cap, "{\"type\": \"https://tools.ietf.org/html/rfc2616#section-10\", "
			    "\"title\": \"An error occurred\", \"status\": 404, \"detail\": \"Not Found\"}");
	return 404;
}

/* The value of a request header (case-insensitive name), or NULL. */
static const char *header(const char *head, const char *name, size_t *len)
{
	size_t nl = strlen(name);
	for (const char *line = strstr(head, "\r\n"); line; line = strstr(line, "\r\n")) {
		line += 2;
		if (strncasecmp(line, name, nl) == 0 && line[nl] == ':') {
			const char *v = line + nl + 1;
			while (*v == ' ')
				v++;
			const char *end = strstr(v, "\r\n");
			*len = end ? (size_t)(end - v) : strlen(v);
			return v;
		}
	}
	return NULL;
}

/* Handle every complete request in the connection's buffer. */
static int handle(int fd)
{
	struct conn *c = conns[fd];
	size_t pos = 0;
	for (;;) {
		char *buf = c->in + pos;
		size_t n = c->inlen - pos;
		char *end = memmem(buf, n, "\r\n\r\n", 4);
		if (!end)
			break;
		size_t headlen = (size_t)(end - buf) + 4;
		char head[INBUF];
		memcpy(head, buf, headlen);
		head[headlen] = 0;
		size_t vl;
		const char *cl = header(head, "Content-Length", &vl);
		size_t bodylen = cl ? (size_t)strtoul(cl, NULL, 10) : 0;
		if (headlen + bodylen > INBUF)
			return -1;
		if (n < headlen + bodylen)
			break;
		char body[INBUF];
		memcpy(body, buf + headlen, bodylen);
		body[bodylen] = 0;
		pos += headlen + bodylen;

		char method[16], path[4096];
		if (sscanf(head, "%15s %4095s", method, path) != 2)
			return -1;
		int close_after = 0;
		const char *conn_hdr = header(head, "Connection", &vl);
		if (conn_hdr && vl == 5 && strncasecmp(conn_hdr, "close", 5) == 0)
			close_after = 1;

		char json[2048];
		int status;
		const char *auth = header(head, "Authorization", &vl);
		char expected[512];
		snprintf(expected, sizeof expected, "Bearer %s", token);
		if (strcmp(method, "GET") == 0 && strcmp(path, "/counts") == 0) {
			status = answer_counts(json, sizeof json);
		} else if (auth && vl == strlen(expected) && strncmp(auth, expected, vl) == 0) {
			status = answer(method, path, body, json, sizeof json);
		} else if (!auth && allow_anonymous) {
			status = answer(method, path, body, json, sizeof json);
		} else {
			status = 401;
			snprintf(json, sizeof json, auth ? "{\"error\": \"Invalid API token\"}"
							 : "{\"error\": \"No API token provided\"}");
		}
		const char *reason = status == 200 ? "OK" : status == 401 ? "Unauthorized"
						    : status == 404 ? "Not Found"
								    : "Unprocessable Content";
		size_t jl = strlen(json);
		struct pending p = {.fd = fd, .gen = c->gen, .due = now_ns() + latency_ns,
				    .close_after = close_after};
		p.data = malloc(jl + 256);
		p.len = (size_t)sprintf(p.data,
					"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
					"Content-Length: %zu\r\nCache-Control: no-cache, private\r\n\r\n%s",
					status, reason, jl, json);
		push(p);
	}
	memmove(c->in, c->in + pos, c->inlen - pos);
	c->inlen -= pos;
	return 0;
}

int main(int argc, char **argv)
{
	int port = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--allow-anonymous")) {
			allow_anonymous = 1;
			continue;
		}
		if (i + 1 >= argc)
			break;
		if (!strcmp(argv[i], "--port"))
			port = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--latency"))
			latency_ns = (uint64_t)(atof(argv[++i]) * 1e9);
		else if (!strcmp(argv[i], "--token"))
			token = argv[++i];
	}
	signal(SIGPIPE, SIG_IGN);
	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	int one = 1;
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
		perror("listen");
		return 2;
	}
	socklen_t al = sizeof addr;
	getsockname(lfd, (struct sockaddr *)&addr, &al);
	printf("listening on http://127.0.0.1:%d\n", ntohs(addr.sin_port));
	fflush(stdout);
	int ep = epoll_create1(0);
	struct epoll_event lev = {.events = EPOLLIN, .data.fd = lfd};
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
	struct epoll_event events[256];
	for (;;) {
		int timeout = -1;
		if (qtail > qhead) {
			uint64_t t = now_ns(), due = queue[qhead % qcap].due;
			timeout = due > t ? (int)((due - t + 999999) / 1000000) : 0;
		}
		int n = epoll_wait(ep, events, 256, timeout);
		for (int e = 0; e < n; e++) {
			int fd = events[e].data.fd;
			if (fd == lfd) {
				int cfd;
				while ((cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					if (cfd >= MAX_FDS) {
						close(cfd);
						continue;
					}
					setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
					if (!conns[cfd])
						conns[cfd] = calloc(1, sizeof(struct conn));
					conns[cfd]->open = 1;
					conns[cfd]->inlen = 0;
					struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
					epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
				}
				continue;
			}
			struct conn *c = conns[fd];
			ssize_t r = read(fd, c->in + c->inlen, INBUF - c->inlen);
			if (r <= 0) {
				if (r < 0 && errno == EAGAIN)
					continue;
				close_conn(fd, ep);
				continue;
			}
			c->inlen += (size_t)r;
			if (handle(fd) < 0 || c->inlen == INBUF)
				close_conn(fd, ep);
		}
		/* Send every answer whose hold-back is over (the queue is in due order). */
		uint64_t t = now_ns();
		while (qtail > qhead && queue[qhead % qcap].due <= t) {
			struct pending p = queue[qhead++ % qcap];
			struct conn *c = conns[p.fd];
			if (c && c->open && c->gen == p.gen) {
				if (write(p.fd, p.data, p.len) != (ssize_t)p.len || p.close_after)
					close_conn(p.fd, ep);
			}
			free(p.data);
		}
	}
}
