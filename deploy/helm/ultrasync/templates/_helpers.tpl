{{/* Chart name, overridable. */}}
{{- define "ultrasync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name of every resource. */}}
{{- define "ultrasync.fullname" -}}
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

{{- define "ultrasync.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "ultrasync.labels" -}}
helm.sh/chart: {{ include "ultrasync.chart" .ctx }}
{{ include "ultrasync.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{- define "ultrasync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ultrasync.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ultrasync.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The Secret with jwt-secret and nats-*-password. Named from the release only, so the
NATS subchart's values can point at it ({release}-ultrasync-secrets).
*/}}
{{- define "ultrasync.secretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else }}
{{- printf "%s-ultrasync-secrets" .Release.Name }}
{{- end }}
{{- end }}

{{/* NATS URLs: the subchart's client Service, or externalNats.url. */}}
{{- define "ultrasync.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- $natsName := "" }}
{{- if .Values.nats.fullnameOverride }}
{{- $natsName = .Values.nats.fullnameOverride }}
{{- else if contains "nats" .Release.Name }}
{{- $natsName = .Release.Name }}
{{- else }}
{{- $natsName = printf "%s-nats" .Release.Name }}
{{- end }}
{{- printf "nats://%s:4222" ($natsName | trunc 63 | trimSuffix "-") }}
{{- else }}
{{- required "externalNats.url is required when nats.enabled=false" .Values.externalNats.url }}
{{- end }}
{{- end }}

{{/*
Environment of every ultrasync container; call with (dict "ctx" $ "user" "gateway"):
the NATS user of deploy/nats/users.conf and its password from the Secret.
*/}}
{{- define "ultrasync.env" -}}
- name: ULTRASYNC_CONFIG
  value: /etc/ultrasync/ultrasync.toml
- name: ULTRASYNC_NATS_URL
  value: {{ include "ultrasync.natsUrl" .ctx | quote }}
- name: ULTRASYNC_NATS_USER
  value: {{ .user | quote }}
- name: ULTRASYNC_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "ultrasync.secretName" .ctx }}
      key: {{ printf "nats-%s-password" .user }}
- name: ULTRASYNC_REPLICAS
  value: {{ .ctx.Values.streamReplicas | quote }}
- name: ULTRASYNC_LOG_FORMAT
  value: {{ .ctx.Values.logFormat | quote }}
{{- end }}

{{/* Volumes every ultrasync pod mounts: the config and a writable /tmp. */}}
{{- define "ultrasync.volumes" -}}
- name: config
  configMap:
    name: {{ include "ultrasync.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "ultrasync.volumeMounts" -}}
- name: config
  mountPath: /etc/ultrasync
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Pod-level settings shared by every ultrasync pod. */}}
{{- define "ultrasync.podSpec" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
