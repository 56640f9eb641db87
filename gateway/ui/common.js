// What both pages share: the key the user typed (kept in localStorage), the status line, reading a file.
const $ = (id) => document.getElementById(id);
$("key").value = localStorage.getItem("gatewayKey") || "";

function headers() {
  const key = $("key").value.trim();
  localStorage.setItem("gatewayKey", key);
  const h = { "Content-Type": "application/json" };
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(message, isError) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
