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

{{/*
NATS URLs: the subchart's client Service (tls:// with natsTls.enabled), or
externalNats.url.
*/}}
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
{{- printf "%s://%s:4222" (ternary "tls" "nats" .Values.natsTls.enabled) ($natsName | trunc 63 | trimSuffix "-") }}
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
{{- with .ctx.Values.traces.otlpEndpoint }}
- name: ULTRASYNC_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- with $.ctx.Values.traces.sampleRatio }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with include "ultrasync.natsTlsEnv" .ctx }}
{{ . }}
{{- end }}
{{- end }}

{{/*
TLS to NATS (natsTls.enabled): the CA of the NATS servers' certificates, and with
natsTls.certKey a client certificate, from the Secret natsTls.existingSecret,
mounted at /etc/ultrasync-nats-tls in every ultrasync pod and the setup Job.
*/}}
{{- define "ultrasync.natsTlsEnv" -}}
{{- if .Values.natsTls.enabled -}}
- name: ULTRASYNC_NATS_TLS_CA
  value: /etc/ultrasync-nats-tls/ca.pem
{{- if .Values.natsTls.certKey }}
- name: ULTRASYNC_NATS_TLS_CERT
  value: /etc/ultrasync-nats-tls/client.pem
- name: ULTRASYNC_NATS_TLS_KEY
  value: /etc/ultrasync-nats-tls/client-key.pem
{{- end }}
{{- end }}
{{- end }}

{{- define "ultrasync.natsTlsVolume" -}}
{{- if .Values.natsTls.enabled -}}
- name: nats-tls
  secret:
    secretName: {{ required "natsTls.existingSecret is required with natsTls.enabled" .Values.natsTls.existingSecret }}
    items:
      - key: {{ .Values.natsTls.caKey }}
        path: ca.pem
      {{- if .Values.natsTls.certKey }}
      - key: {{ .Values.natsTls.certKey }}
        path: client.pem
      - key: {{ required "natsTls.keyKey goes with natsTls.certKey" .Values.natsTls.keyKey }}
        path: client-key.pem
      {{- end }}
{{- end }}
{{- end }}

{{- define "ultrasync.natsTlsVolumeMount" -}}
{{- if .Values.natsTls.enabled -}}
- name: nats-tls
  mountPath: /etc/ultrasync-nats-tls
  readOnly: true
{{- end }}
{{- end }}

{{/*
Volumes every ultrasync pod mounts: the config, a writable /tmp and, with
natsTls.enabled, the NATS CA (and client certificate).
*/}}
{{- define "ultrasync.volumes" -}}
- name: config
  configMap:
    name: {{ include "ultrasync.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- with include "ultrasync.natsTlsVolume" . }}
{{ . }}
{{- end }}
{{- end }}

{{- define "ultrasync.volumeMounts" -}}
- name: config
  mountPath: /etc/ultrasync
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- with include "ultrasync.natsTlsVolumeMount" . }}
{{ . }}
{{- end }}
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
