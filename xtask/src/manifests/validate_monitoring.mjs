// Validates the monitoring.coreos.com objects of a rendered kustomization (JSON lines on
// stdin) with the models that @kubernetes-models/prometheus-operator generates from
// prometheus-operator's CRDs: types, required fields and patterns. Exits 1 on any error.
import { createInterface } from "node:readline";
import * as v1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

let failed = 0;
let checked = 0;
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const doc = JSON.parse(line);
  if (doc.apiVersion !== "monitoring.coreos.com/v1") continue;
  const Model = v1[doc.kind];
  const name = `${doc.kind} ${doc.metadata?.namespace}/${doc.metadata?.name}`;
  if (!Model) {
    console.error(`${name}: no such kind in monitoring.coreos.com/v1`);
    failed++;
    continue;
  }
  try {
    new Model(doc).validate();
    checked++;
  } catch (err) {
    console.error(`${name}: ${err.message}`);
    failed++;
  }
}
console.error(`monitoring.coreos.com: ${checked} objects valid, ${failed} invalid`);
process.exit(failed > 0 || checked === 0 ? 1 : 0);
