// The nodemailer contender of bench/throughput.py: what a Node user writes.
//
//   node nodemailer_send.js send MAIL.json PORT COUNT CONNECTIONS
//   node nodemailer_send.js size MAIL.json
//
// MAIL.json is one invitation as invite-mailer composed it, taken apart by
// throughput.py: subject, text part, HTML part, the extra headers and the
// calendar files. "send" builds every message anew with nodemailer's own
// MailComposer (transporter.sendMail) and sends it through a pooled SMTP
// transport to 127.0.0.1:PORT, with only the recipient changed per message.
// "size" prints the size in bytes of one such message, so the report can show
// that both sides carry the same mail. nodemailer is found through NODE_PATH:
// throughput.py installs it into a cache folder, never into the repository.
"use strict";

const fs = require("fs");
const nodemailer = require("nodemailer");

// In-flight messages: enough to keep every pooled connection busy, bounded so
// that the queue does not hold every composed message at once.
const WINDOW_PER_CONNECTION = 8;

function mailFor(spec, number) {
  const id = String(number).padStart(6, "0");
  return {
    from: spec.from,
    to: { name: spec.to_name, address: `kontakt${id}@bench.example.org` },
    replyTo: spec.reply_to,
    subject: spec.subject,
    text: spec.text,
    html: spec.html,
    headers: spec.headers,
    attachments: spec.attachments.map((a) => ({
      filename: a.filename,
      content: a.content,
      contentType: a.content_type,
      contentDisposition: "attachment",
    })),
  };
}

async function send(spec, port, count, connections) {
  const transporter = nodemailer.createTransport({
    host: "127.0.0.1",
    port,
    secure: false,
    ignoreTLS: true,
    pool: true,
    maxConnections: connections,
    maxMessages: Infinity,
  });
  let next = 0;
  let accepted = 0;
  async function worker() {
    while (next < count) {
      const info = await transporter.sendMail(mailFor(spec, next++));
      accepted += info.accepted.length;
    }
  }
  const window = Math.max(1, connections * WINDOW_PER_CONNECTION);
  await Promise.all(Array.from({ length: Math.min(window, count) }, worker));
  transporter.close();
  if (accepted !== count) {
    throw new Error(`accepted ${accepted} of ${count} recipients`);
  }
  process.stdout.write(JSON.stringify({ sent: accepted }) + "\n");
}

async function size(spec) {
  const transporter = nodemailer.createTransport({ streamTransport: true, buffer: true });
  const info = await transporter.sendMail(mailFor(spec, 0));
  process.stdout.write(JSON.stringify({ bytes: info.message.length }) + "\n");
}

async function main() {
  const [mode, specPath, ...rest] = process.argv.slice(2);
  const spec = JSON.parse(fs.readFileSync(specPath, "utf8"));
  if (mode === "send") {
    const [port, count, connections] = rest.map(Number);
    await send(spec, port, count, connections);
  } else if (mode === "size") {
    await size(spec);
  } else {
    throw new Error(`unknown mode ${mode}: use send or size`);
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
