{{/* Labels every object carries. */}}
{{- define "diaggym.labels" -}}
app.kubernetes.io/part-of: diaggym
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* Pod-level security context: non-root UID 10001, seccomp RuntimeDefault (Pod Security "restricted"). */}}
{{- define "diaggym.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context: read-only root, no escalation, no capabilities. */}}
{{- define "diaggym.containerSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "diaggym.image" -}}
{{ .repository }}:{{ .tag }}
{{- end }}

{{/* checkov skip for image digests, written on the resource with its reason. */}}
{{- define "diaggym.digestSkip" -}}
checkov.io/skip1: "CKV_K8S_43=tags are pinned; digests are set by the release process (kustomize images / Helm values), not in the repository"
{{- end }}
