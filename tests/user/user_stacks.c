/* Kernel objects made through known functions, for `--user-stacks` to lead back to:
 *
 *   user_stacks eventfds N: opens N eventfds (the kernel kmallocs a `struct eventfd_ctx` for
 *     each in do_eventfd) through open_session_fds, prints `ready`, and holds them until
 *     standard input closes.
 *   user_stacks messages N: creates a System V message queue, sends it N messages (a
 *     `struct msg_msg` each, from load_msg) through post_messages, prints the queue's id and
 *     exits, leaving the queue and its messages behind (the caller removes it).
 *
 * The C library's system call wrappers make no stack frame, so unwinding by frame pointers
 * passes over their caller (open_one, post_one) and goes on from its caller: the tests look
 * for open_session_fds and post_messages, at the lines marked below. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/msg.h>
#include <unistd.h>

#define MAX_OBJECTS 100000

int fds[MAX_OBJECTS];

__attribute__((noinline)) int open_one(void)
{
	return eventfd(0, EFD_CLOEXEC);
}

__attribute__((noinline)) int open_session_fds(int n)
{
	for (int i = 0; i < n; i++) {
		fds[i] = open_one(); /* expected: eventfds */
		if (fds[i] < 0)
			return -1;
	}
	return 0;
}

struct message {
	long type;
	char text[64];
};

__attribute__((noinline)) int post_one(int queue, int i)
{
	struct message message = { .type = 1 };

	snprintf(message.text, sizeof message.text, "message %d", i);
	return msgsnd(queue, &message, sizeof message.text, IPC_NOWAIT);
}

__attribute__((noinline)) int post_messages(int queue, int n)
{
	for (int i = 0; i < n; i++)
		if (post_one(queue, i) != 0) /* expected: messages */
			return -1;
	return 0;
}

int main(int argc, char **argv)
{
	int n = argc > 2 ? atoi(argv[2]) : 0;
	char byte;

	if (argc != 3 || n <= 0 || n > MAX_OBJECTS) {
		fprintf(stderr, "usage: user_stacks eventfds|messages N (1 to %d)\n", MAX_OBJECTS);
		return 2;
	}
	if (strcmp(argv[1], "eventfds") == 0) {
		if (open_session_fds(n) != 0) {
			perror("eventfd");
			return 1;
		}
		printf("ready\n");
		fflush(stdout);
		while (read(0, &byte, 1) > 0)
			;
		return 0;
	}
	if (strcmp(argv[1], "messages") == 0) {
		int queue = msgget(IPC_PRIVATE, IPC_CREAT | 0600);

		if (queue < 0 || post_messages(queue, n) != 0) {
			perror("message queue");
			return 1;
		}
		printf("%d\n", queue);
		return 0;
	}
	fprintf(stderr, "user_stacks: unknown mode %s\n", argv[1]);
	return 2;
}
