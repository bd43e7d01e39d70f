{{/*
Chart name, overridable by nameOverride; 63 characters at most (DNS label).
*/}}
{{- define "kvpilot.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: "<release>-<chart>", or the release name when it already holds the chart
name. Truncated to 63 characters because some Kubernetes name fields are limited to that.
*/}}
{{- define "kvpilot.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "kvpilot.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "kvpilot.labels" -}}
helm.sh/chart: {{ include "kvpilot.chart" . }}
{{ include "kvpilot.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvpilot
{{- end }}

{{/*
Labels that select the operator pods; never change them on upgrade (Deployment selectors are immutable).
*/}}
{{- define "kvpilot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvpilot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "kvpilot.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvpilot.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the kopf peering object shared by the operator replicas.
*/}}
{{- define "kvpilot.peeringName" -}}
{{- default (include "kvpilot.fullname" .) .Values.peering.name }}
{{- end }}

{{/*
An image reference "registry/repository:tag@digest" from an image values block; the tag defaults
to the chart's appVersion. Call with (dict "image" .Values.image "context" $).
*/}}
{{- define "kvpilot.image" -}}
{{- $tag := default .context.Chart.AppVersion .image.tag }}
{{- $ref := printf "%s/%s:%s" .image.registry .image.repository $tag }}
{{- if .image.digest }}
{{- $ref = printf "%s@%s" $ref .image.digest }}
{{- end }}
{{- $ref }}
{{- end }}

{{/*
True ("true") when the operator watches every namespace, empty otherwise.
*/}}
{{- define "kvpilot.clusterWide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
RBAC rules for the namespaced resources the operator reads and writes: LLMDeployments and the
children it renders for them. A ClusterRole carries them when the operator watches every
namespace, a Role in each watched namespace otherwise.
*/}}
{{- define "kvpilot.namespacedRules" -}}
# LLMDeployments: kopf lists and watches them and patches its finalizer and annotations on them.
- apiGroups: ["kvpilot.io"]
  resources: ["llmdeployments"]
  verbs: ["get", "list", "watch", "patch"]
# Status: plan, conditions, replicas, KV utilisation.
- apiGroups: ["kvpilot.io"]
  resources: ["llmdeployments/status"]
  verbs: ["get", "patch"]
# Owner references with blockOwnerDeletion on the children need this where the
# OwnerReferencesPermissionEnforcement admission plugin runs (e.g. OpenShift).
- apiGroups: ["kvpilot.io"]
  resources: ["llmdeployments/finalizers"]
  verbs: ["update"]
# Children (operator/kube.py CHILD_RESOURCES): watched for drift, created or merge-patched, pruned
# when the spec stops asking for them. Nothing is ever replaced with PUT, so no "update".
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["leaderworkerset.x-k8s.io"]
  resources: ["leaderworkersets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Serving pods: readiness and KV-cache utilisation, for the operator's own autoscaler.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# The Secret an LLMDeployment names in spec.model.tokenSecret, read by name to fetch the
# config.json of a gated hub model while planning. Never listed or watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Events about decisions and failures (kopf.event / kopf.info / kopf.warn post them).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
