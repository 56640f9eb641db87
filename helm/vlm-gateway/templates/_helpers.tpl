{{/* Names and labels shared by every template. */}}
{{- define "vlm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vlm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vlm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "vlm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include "vlm.selector" (list . "gateway") */}}
{{- define "vlm.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "vlm.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "vlm.gatewayImage" -}}
{{- printf "%s:%s" .Values.gateway.image.repository .Values.gateway.image.tag -}}
{{- end -}}

{{- define "vlm.retrievalUrl" -}}
{{- printf "http://%s-retrieval:%d" (include "vlm.fullname" .) (int .Values.retrieval.port) -}}
{{- end -}}

{{/* The headless Service (and in-cluster DNS name) of one vLLM pool: include "vlm.poolName" (list . $pool).
Headless, so that the name resolves to every ready pod: the gateway discovers them and routes, health-checks and
breaks per pod rather than per ClusterIP. */}}
{{- define "vlm.poolName" -}}
{{- printf "%s-vllm-%s" (include "vlm.fullname" (index . 0)) (index . 1).name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prometheus label matcher that scopes a query to this release's namespace. */}}
{{- define "vlm.promScope" -}}
{{- printf "namespace=%q" .Release.Namespace -}}
{{- end -}}

{{/* The proxy's config file, rendered from values (gateway/config.py documents every setting). */}}
{{- define "vlm.gatewayConfig" -}}
{{- $models := list -}}
{{- range .Values.vllm.pools -}}
{{- $discover := printf "http://%s.%s.svc:%d" (include "vlm.poolName" (list $ .)) $.Release.Namespace (int $.Values.vllm.port) -}}
{{- $quant := .quantization | default "bf16" -}}
{{- $pool := dict "name" .servedModelName "discover" $discover "limit_mm_per_prompt" .limitMmPerPrompt "max_model_len" .maxModelLen "quantization" $quant "min_pixels" .minPixels "max_pixels" .maxPixels -}}
{{- if (.lora).enabled -}}
{{- $modules := list -}}
{{- range .lora.modules -}}
{{- $modules = append $modules (dict "name" .name "path" .path) -}}
{{- end -}}
{{- $_ := set $pool "lora_modules" $modules -}}
{{- if .lora.runtimeLoading -}}
{{- $_ := set $pool "adapter_roots" (list .lora.volume.mountPath) -}}
{{- end -}}
{{- end -}}
{{- $models = append $models (mergeOverwrite $pool (.gatewayPool | default dict)) -}}
{{- end -}}
{{- $base := dict "role" "proxy" "host" "0.0.0.0" "port" .Values.gateway.port "metrics_port" .Values.gateway.metricsPort "log_level" .Values.gateway.logLevel "models" $models "drain_delay" 0 "drain_timeout" .Values.gateway.drainTimeoutSeconds -}}
{{- if .Values.retrieval.enabled -}}
{{- $_ := set $base "retrieval_url" (include "vlm.retrievalUrl" .) -}}
{{- end -}}
{{- if .Values.gateway.apiKeys.existingSecret -}}
{{- $_ := set $base "keys_file" (printf "/etc/vlm-gateway/keys/%s" .Values.gateway.apiKeys.key) -}}
{{- end -}}
{{- toYaml (mergeOverwrite $base (deepCopy .Values.gateway.config)) -}}
{{- end -}}

{{- define "vlm.retrievalConfig" -}}
{{- $r := .Values.retrieval -}}
{{- $embeddings := dict "clip_model" $r.clipModel "pretrained" $r.clipPretrained "device" $r.device -}}
{{- $search := dict "index_dir" "/var/lib/vlm-gateway/index" -}}
{{- if eq $r.backend "milvus" -}}
{{- $search = dict "backend" "milvus" "milvus_uri" $r.milvus.uri "milvus_consistency" $r.milvus.consistency -}}
{{- end -}}
{{- /* Batches keep their files and job state on the StatefulSet's volume and send lines through the proxies
(one scheduler, one fair share), signed with the secret both tiers share: without that secret, or on the
stateless milvus Deployment, which keeps no volume, the chart runs no batches. */ -}}
{{- $batch := dict "enabled" false -}}
{{- if and (ne $r.backend "milvus") .Values.gateway.batchSecret.existingSecret -}}
{{- $batch = dict "dir" "/var/lib/vlm-gateway/batch" "dispatch_url" (printf "http://%s-gateway:%d" (include "vlm.fullname" .) (int .Values.gateway.port)) -}}
{{- end -}}
{{- $base := dict "role" "retrieval" "host" "0.0.0.0" "port" $r.port "metrics_port" .Values.gateway.metricsPort "log_level" .Values.gateway.logLevel "embeddings" $embeddings "search" $search "batch" $batch "drain_delay" 0 "drain_timeout" .Values.gateway.drainTimeoutSeconds -}}
{{- if .Values.gateway.apiKeys.existingSecret -}}
{{- $_ := set $base "keys_file" (printf "/etc/vlm-gateway/keys/%s" .Values.gateway.apiKeys.key) -}}
{{- end -}}
{{- toYaml (mergeOverwrite $base (deepCopy $r.config)) -}}
{{- end -}}

{{/* Hardened container settings for the gateway and retrieval pods (the image runs as uid 10001). */}}
{{- define "vlm.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Seconds a pod may take to stop: the endpoint-removal delay, the drain budget and a margin. */}}
{{- define "vlm.terminationGrace" -}}
{{- add (int .Values.gateway.drainDelaySeconds) (int .Values.gateway.drainTimeoutSeconds) 10 -}}
{{- end -}}
