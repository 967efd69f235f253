"""The seed article's server (SPEC section 1), for interop tests.

One shared task list; each getTask stream sends every task from the first one
on; a producer thread adds `count` tasks "task:<100..200>" every `every`
seconds; sendStatus answers "server received: <msg>"; tellResult prints the
results. Only the port and the task rate come from the command line.

usage: seed_server.py STUBS_DIR COUNT EVERY [PORT]   (PORT 0 or absent: any free port)
Prints "LISTENING <port>", then "RESULT <ret>" and "STATUS <msg>" lines.
"""
import random
import sys
import threading
import time
from concurrent import futures

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import contact_pb2  # noqa: E402
import contact_pb2_grpc  # noqa: E402

TASKS = []
LOCK = threading.Lock()


def say(line):
    with LOCK:
        print(line, flush=True)


class ContactServicer(contact_pb2_grpc.ContactServicer):
    def sendStatus(self, request_iterator, context):
        for msg in request_iterator:
            say("STATUS " + msg.msg)
            yield contact_pb2.Result(ret="server received: " + msg.msg)

    def getTask(self, request, context):
        sent = 0
        while context.is_active():
            while sent < len(TASKS):
                yield contact_pb2.ServerMsg(task=TASKS[sent])
                sent += 1
            time.sleep(0.01)

    def tellResult(self, request_iterator, context):
        for result in request_iterator:
            say("RESULT " + result.ret)
        return contact_pb2.Empty()


def produce(count, every):
    while True:
        for _ in range(count):
            TASKS.append("task:%d" % random.randint(100, 200))
        time.sleep(every)


def main():
    count, every = int(sys.argv[2]), float(sys.argv[3])
    wanted = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=10))
    contact_pb2_grpc.add_ContactServicer_to_server(ContactServicer(), server)
    port = server.add_insecure_port("127.0.0.1:%d" % wanted)
    server.start()
    threading.Thread(target=produce, args=(count, every), daemon=True).start()
    say("LISTENING %d" % port)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
