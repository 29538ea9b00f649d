{{- define "casb.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "casb.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "casb.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* casb.yaml: the user's config plus the paths and listeners the chart owns. */}}
{{- define "casb.config" -}}
{{- $tls := dict "cert_file" "/etc/casb/tls/tls.crt" "key_file" "/etc/casb/tls/tls.key" -}}
{{- $owned := dict
  "state_dir" "/var/lib/casb"
  "listeners" (list (dict "mode" "reverse" "host" "0.0.0.0" "port" .Values.service.proxyPort "tls" $tls))
  "policy" (dict "paths" (list "/etc/casb/policies"))
  "audit" (dict "path" "/var/log/casb/audit.jsonl") -}}
{{- $admin := merge (dict "host" "0.0.0.0" "port" .Values.service.adminPort) (.Values.config.admin | default dict) -}}
{{- $cfg := merge (dict "admin" $admin) $owned (omit .Values.config "admin") -}}
{{- toYaml $cfg -}}
{{- end -}}
