// Validate custom resources against their CRD schemas (test-only helper).
// stdin: a JSON array of objects; stdout: a JSON array of {kind, name, status, error}.
// status is "valid", "invalid" or "no-schema" (no published CRD model for that group).
const MODELS = {
  "networking.istio.io/v1": "@kubernetes-models/istio/networking.istio.io/v1",
  "security.istio.io/v1": "@kubernetes-models/istio/security.istio.io/v1",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
};

const input = JSON.parse(await new Promise((resolve) => {
  let data = "";
  process.stdin.on("data", (chunk) => (data += chunk));
  process.stdin.on("end", () => resolve(data));
}));

const results = [];
for (const obj of input) {
  const base = { kind: obj.kind, name: obj.metadata?.name, apiVersion: obj.apiVersion };
  const module = MODELS[obj.apiVersion];
  if (!module) { results.push({ ...base, status: "no-schema" }); continue; }
  const models = await import(`${module}/${obj.kind}`);
  const Model = models[obj.kind];
  if (!Model) { results.push({ ...base, status: "no-schema" }); continue; }
  try {
    new Model(obj).validate();
    results.push({ ...base, status: "valid" });
  } catch (e) {
    results.push({ ...base, status: "invalid", error: String(e.message ?? e) });
  }
}
process.stdout.write(JSON.stringify(results));
