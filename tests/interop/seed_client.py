"""The seed article's client (SPEC section 1), for interop tests.

Calls getTask and turns that stream directly into the request stream of
tellResult: one Result "client received task: <task>" per task. Sends a burst
of status messages over sendStatus and prints the replies. Stops after
MAX_RESULTS results so that the test can see tellResult complete.

usage: seed_client.py STUBS_DIR ADDR MAX_RESULTS STATUS_BURST
Prints "TASK <task>", "REPLY <ret>" and finally "ACKED <n>".
"""
import sys
import threading

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import contact_pb2  # noqa: E402
import contact_pb2_grpc  # noqa: E402

LOCK = threading.Lock()


def say(line):
    with LOCK:
        print(line, flush=True)


def main():
    addr, max_results, burst = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    channel = grpc.insecure_channel(addr)
    stub = contact_pb2_grpc.ContactStub(channel)

    def status():
        msgs = (contact_pb2.ClientMsg(msg="status %d" % i) for i in range(burst))
        for reply in stub.sendStatus(msgs):
            say("REPLY " + reply.ret)

    status_thread = threading.Thread(target=status)
    status_thread.start()

    sent = [0]

    def results():
        for task in stub.getTask(contact_pb2.Empty()):
            say("TASK " + task.task)
            yield contact_pb2.Result(ret="client received task: " + task.task)
            sent[0] += 1
            if sent[0] == max_results:
                return

    stub.tellResult(results())
    status_thread.join()
    say("ACKED %d" % sent[0])


if __name__ == "__main__":
    main()
