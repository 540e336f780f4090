"""A real SMTP server for errand's alert tests (aiosmtpd, from Debian's
python3-aiosmtpd). Prints one JSON line per message it accepts on stdout.

Recipients containing "reject" are refused with 550 (permanent), those
containing "busy" with 451 (transient); everything else is accepted. Each
line holds the envelope ("from", "to"), the subject, the text and HTML bodies,
and the From, Cc, Reply-To and Bcc headers ("" when absent).

Usage: /usr/bin/python3 smtp_sink.py PORT
"""
import email
import json
import sys
import threading
from email import policy

from aiosmtpd.controller import Controller


class Sink:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if "reject" in address:
            return "550 5.1.1 No such user here"
        if "busy" in address:
            return "451 4.3.0 Mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=policy.default)
        part = lambda kind: message.get_body(preferencelist=(kind,))
        print(json.dumps({
            "from": envelope.mail_from,
            "to": envelope.rcpt_tos,
            "subject": str(message["subject"]),
            "text": part("plain").get_content() if part("plain") else "",
            "html": part("html").get_content() if part("html") else "",
            "header_from": str(message["from"] or ""),
            "cc": str(message["cc"] or ""),
            "reply_to": str(message["reply-to"] or ""),
            "bcc_header": str(message["bcc"] or ""),
        }), flush=True)
        return "250 Message accepted for delivery"


if __name__ == "__main__":
    port = int(sys.argv[1])
    controller = Controller(Sink(), hostname="127.0.0.1", port=port)
    controller.start()
    print(json.dumps({"ready": port}), flush=True)
    threading.Event().wait()
