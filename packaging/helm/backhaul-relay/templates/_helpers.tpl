{{/* Names and labels. */}}
{{- define "backhaul-relay.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "backhaul-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "backhaul-relay.labels" -}}
{{ include "backhaul-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "backhaul-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "backhaul-relay.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* True when the chart must make its own Secret for inline URLs or the secret key. */}}
{{- define "backhaul-relay.ownSecret" -}}
{{- if or .Values.database.url .Values.redis.url .Values.secretKey.value -}}true{{- end -}}
{{- end -}}

{{/* An env entry read from the chart's Secret or an existing one: (dict "ctx" . "name" ENV "cfg" VALUES "key" KEY). */}}
{{- define "backhaul-relay.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ default (include "backhaul-relay.fullname" .ctx) .cfg.existingSecret }}
      key: {{ if .cfg.existingSecret }}{{ .cfg.existingSecretKey }}{{ else }}{{ .key }}{{ end }}
{{- end -}}
