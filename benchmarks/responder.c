/*
 * A trivial server for the load generator's own check: it answers every
 * request at once, with no work behind it, so the rate the generator
 * reaches against it is the generator's ceiling, not a server's.
 *
 *   responder --port PORT --protocol socketmap|policy|sasl
 *
 * socketmap: every netstring is answered "OK 1"; policy: every request
 * block "action=DUNNO"; sasl: the Dovecot handshake, then every AUTH line
 * "OK <id> user=x".  Prints "listening on PORT" once it accepts.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

enum proto { SOCKETMAP, POLICY, SASL };

struct conn {
	int fd;
	size_t inlen;
	char in[16384];
};

static enum proto protocol = SOCKETMAP;

static const char HELLO[] = "VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
			    "SPID\t1\nCUID\t1\nCOOKIE\t0123456789abcdef0123456789abcdef\nDONE\n";

/* Answer every complete request in the buffer; return bytes consumed. */
static size_t serve(struct conn *c, char *out, size_t *outlen)
{
	size_t pos = 0;
	*outlen = 0;
	for (;;) {
		char *buf = c->in + pos;
		size_t n = c->inlen - pos;
		if (protocol == SOCKETMAP) {
			size_t len = 0, i = 0;
			while (i < n && buf[i] >= '0' && buf[i] <= '9')
				len = len * 10 + (size_t)(buf[i++] - '0');
			if (i == n || n < i + 1 + len + 1)
				break;
			pos += i + len + 2;
			memcpy(out + *outlen, "4:OK 1,", 7);
			*outlen += 7;
		} else if (protocol == POLICY) {
			char *end = memmem(buf, n, "\n\n", 2);
			if (!end)
				break;
			pos += (size_t)(end - buf) + 2;
			memcpy(out + *outlen, "action=DUNNO\n\n", 14);
			*outlen += 14;
		} else {
			char *nl = memchr(buf, '\n', n);
			if (!nl)
				break;
			pos += (size_t)(nl - buf) + 1;
			if (n > 5 && memcmp(buf, "AUTH\t", 5) == 0) {
				char *tab = memchr(buf + 5, '\t', (size_t)(nl - buf) - 5);
				size_t idlen = tab ? (size_t)(tab - buf) - 5 : 0;
				*outlen += (size_t)sprintf(out + *outlen, "OK\t%.*s\tuser=x\n", (int)idlen,
							   buf + 5);
			}
		}
		if (*outlen > 60000)
			break;
	}
	return pos;
}

int main(int argc, char **argv)
{
	int port = 0;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--port"))
			port = atoi(argv[i + 1]);
		else if (!strcmp(argv[i], "--protocol"))
			protocol = !strcmp(argv[i + 1], "policy") ? POLICY
				   : !strcmp(argv[i + 1], "sasl") ? SASL
								   : SOCKETMAP;
	}
	signal(SIGPIPE, SIG_IGN);
	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	int one = 1;
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 1024) < 0) {
		perror("listen");
		return 2;
	}
	socklen_t al = sizeof addr;
	getsockname(lfd, (struct sockaddr *)&addr, &al);
	printf("listening on %d\n", ntohs(addr.sin_port));
	fflush(stdout);
	int ep = epoll_create1(0);
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	struct epoll_event events[256];
	static char out[70000];
	for (;;) {
		int n = epoll_wait(ep, events, 256, -1);
		for (int e = 0; e < n; e++) {
			struct conn *c = events[e].data.ptr;
			if (!c) {
				int fd;
				while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
					c = calloc(1, sizeof *c);
					c->fd = fd;
					struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
					epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
					if (protocol == SASL && write(fd, HELLO, sizeof HELLO - 1) < 0)
						perror("write");
				}
				continue;
			}
			ssize_t r = read(c->fd, c->in + c->inlen, sizeof c->in - c->inlen);
			if (r <= 0) {
				if (r < 0 && errno == EAGAIN)
					continue;
				close(c->fd);
				free(c);
				continue;
			}
			c->inlen += (size_t)r;
			size_t outlen;
			size_t used = serve(c, out, &outlen);
			memmove(c->in, c->in + used, c->inlen - used);
			c->inlen -= used;
			if (outlen && write(c->fd, out, outlen) < 0 && errno != EAGAIN) {
				close(c->fd);
				free(c);
			}
		}
	}
}
