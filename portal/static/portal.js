// What every script of the portal shares: the session's CSRF token on each request,
// an idempotency key per action, JSON errors as messages, and Stripe.js from the
// configured base (loaded by the page's own <script src> before this module runs).

const csrf = document.querySelector('meta[name="csrf-token"]')?.content ?? '';

// A notice (?notice=...) is said once: reloading the page does not say it again.
if (new URL(window.location.href).searchParams.has('notice')) {
  const url = new URL(window.location.href);
  url.searchParams.delete('notice');
  window.history.replaceState(null, '', url.pathname + url.search + url.hash);
}

export class PortalError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;  // the HTTP status that said no (0: not an answer of our server)
  }
}

export async function postJSON(url, body, idempotencyKey) {
  const headers = {'Content-Type': 'application/json', 'Accept': 'application/json', 'X-CSRF-Token': csrf};
  if (idempotencyKey) headers['Idempotency-Key'] = idempotencyKey;
  const response = await fetch(url, {method: 'POST', headers, body: JSON.stringify(body ?? {}), credentials: 'same-origin'});
  return answer(response);
}

export async function getJSON(url) {
  const response = await fetch(url, {headers: {'Accept': 'application/json'}, credentials: 'same-origin'});
  return answer(response);
}

async function answer(response) {
  let data = null;
  try { data = await response.json(); } catch { data = null; }
  if (!response.ok) {
    throw new PortalError(data?.error?.message ?? `the request failed (${response.status})`, response.status);
  }
  return data;
}

export function stripe() {
  const key = document.querySelector('meta[name="stripe-key"]')?.content;
  if (!key || typeof window.Stripe !== 'function') {
    throw new PortalError('card entry is not available right now (Stripe.js did not load)');
  }
  return window.Stripe(key);
}

export function newKey(prefix) {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return prefix + '-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

export function say(element, text, kind) {
  element.textContent = text;
  element.classList.remove('ok', 'error');
  if (kind) element.classList.add(kind);
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A card that needs the customer (3-D Secure): Stripe.js's own flow. handleNextAction is
// Stripe's method for payments confirmed on the server; the local stand-in has only
// confirmCardPayment, which does the same for a payment waiting on the customer.
export async function finishPayment(stripeClient, clientSecret) {
  const result = typeof stripeClient.handleNextAction === 'function'
    ? await stripeClient.handleNextAction({clientSecret})
    : await stripeClient.confirmCardPayment(clientSecret);
  if (result.error) throw new PortalError(result.error.message ?? 'the bank did not confirm the payment');
  return result.paymentIntent;
}

// A new card, entered in Stripe Elements and saved to the customer with a SetupIntent.
export async function saveNewCard(stripeClient, card, {setDefault, key}) {
  const intent = await postJSON('/portal/payment-methods/setup-intent', {}, key + '-setup');
  const result = await stripeClient.confirmCardSetup(intent.client_secret, {payment_method: {card}});
  if (result.error) throw new PortalError(result.error.message ?? 'the card was not accepted');
  const pm = result.setupIntent.payment_method;
  const id = typeof pm === 'string' ? pm : pm.id;
  return postJSON('/portal/payment-methods', {payment_method_id: id, set_default: setDefault}, key + '-attach');
}
