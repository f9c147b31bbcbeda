// Checks HTML mails against caniemail.com's data (the `caniemail` npm package).
//
//   node caniemail_check.mjs NODE_MODULES_DIR < request.json > answer.json
//
// request: {"clients": ["outlook.windows", "gmail.*"], "pages": {"name": "<html>..."}}
// answer:  {"version": "...", "pages": {"name": [{"client", "title", "support", "notes", "line"}]}}
// Only errors are listed: features caniemail marks as not supported at all
// (partial support is a warning there and not reported here).
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const entry = path.join(modules, "caniemail", "dist", "index.js");
const { caniemail } = await import(pathToFileURL(entry).href);
const version = JSON.parse(
  fs.readFileSync(path.join(modules, "caniemail", "package.json"), "utf8"),
).version;

const request = JSON.parse(fs.readFileSync(0, "utf8"));
const pages = {};
for (const [name, html] of Object.entries(request.pages)) {
  const result = caniemail({ clients: request.clients, html });
  const found = [];
  for (const [client, issues] of result.issues.errors) {
    for (const issue of issues) {
      found.push({
        client,
        title: issue.title,
        support: issue.support,
        notes: issue.notes,
        line: issue.position ? issue.position.start.line : null,
      });
    }
  }
  pages[name] = found;
}
process.stdout.write(JSON.stringify({ version, pages }));
